"""User-facing errors (exit code 2). Defined in `deploy` so both packages share one class."""
from deploy.errors import BadInput, DeviceUnavailable

__all__ = ["BadInput", "DeviceUnavailable"]
