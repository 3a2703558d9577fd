"""The `--out` folder of one job: refuse, resume, or start over, never silently overwrite.

A run folder holds `job.json` (what was asked) and `stages/<name>.json` (what each
finished stage produced). `--resume` continues a folder whose job matches; `--force`
starts over, but only in a folder that a previous `compress` run created.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from compressor.errors import BadInput
from deploy.atomic_io import atomic_write_text

JOB_FILE = "job.json"


class RunDirectory:
    def __init__(self, path: Path, *, fingerprint: dict, force: bool = False, resume: bool = False):
        if force and resume:
            raise BadInput("--force and --resume contradict each other; pick one")
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.force = force
        self.resume = resume
        self.resumed = False

    def prepare(self) -> "RunDirectory":
        path = self.path
        if path.exists() and not path.is_dir():
            raise BadInput(f"--out {path} exists and is a file, not a folder")
        occupied = path.exists() and any(path.iterdir())
        if occupied:
            job_file = path / JOB_FILE
            if self.resume:
                if not job_file.exists():
                    raise BadInput(f"--resume: {path} has no {JOB_FILE}; it is not a compress run folder")
                previous = json.loads(job_file.read_text())
                if previous != self.fingerprint:
                    changed = sorted(k for k in set(previous) | set(self.fingerprint)
                                     if previous.get(k) != self.fingerprint.get(k))
                    raise BadInput(f"--resume: {path} was run with different settings ({', '.join(changed)}); "
                                   "use a new --out or --force")
                self.resumed = True
                return self
            if not self.force:
                raise BadInput(f"--out {path} exists and is not empty; use --resume to continue it, "
                               "--force to start over, or another --out")
            if not job_file.exists():
                raise BadInput(f"--force: {path} is not a compress run folder (no {JOB_FILE}); refusing to delete it")
            shutil.rmtree(path)
        (path / "stages").mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / JOB_FILE, json.dumps(self.fingerprint, indent=2, sort_keys=True))
        return self

    def load_stage(self, name: str) -> dict | None:
        """A finished stage's record, when resuming; None otherwise."""
        stage = self.path / "stages" / f"{name}.json"
        if not self.resumed or not stage.exists():
            return None
        return json.loads(stage.read_text())

    def save_stage(self, name: str, record: dict[str, Any]) -> None:
        atomic_write_text(self.path / "stages" / f"{name}.json", json.dumps(record, indent=2))
