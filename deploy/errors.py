"""Errors a user can fix. The CLI prints them as one line and exits 2."""


class BadInput(Exception):
    """Bad input or usage: a missing file, an unknown name, a malformed profile."""


class DeviceUnavailable(BadInput):
    """The target's backend or device is not on this host.

    The message names what is missing and how to run on the device instead; we never
    fall back to measuring some other hardware.
    """
