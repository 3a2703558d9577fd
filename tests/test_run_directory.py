"""--out handling: refuse, resume, or start over; never silently overwrite."""
import pytest

from compressor.errors import BadInput
from compressor.run_directory import RunDirectory


def test_fresh_folder_is_created(tmp_path):
    run = RunDirectory(tmp_path / "run", fingerprint={"a": 1}).prepare()
    assert (run.path / "job.json").exists()


def test_non_empty_folder_refused_and_untouched(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(BadInput, match="not empty"):
        RunDirectory(out, fingerprint={"a": 1}).prepare()
    with pytest.raises(BadInput, match="not a compress run folder"):
        RunDirectory(out, fingerprint={"a": 1}, force=True).prepare()
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_resume_requires_same_job(tmp_path):
    out = tmp_path / "run"
    run = RunDirectory(out, fingerprint={"a": 1}).prepare()
    run.save_stage("importance", {"scores": {"x": 1.0}})
    with pytest.raises(BadInput, match="different settings"):
        RunDirectory(out, fingerprint={"a": 2}, resume=True).prepare()
    resumed = RunDirectory(out, fingerprint={"a": 1}, resume=True).prepare()
    assert resumed.resumed and resumed.load_stage("importance") == {"scores": {"x": 1.0}}


def test_force_starts_over_in_a_run_folder(tmp_path):
    out = tmp_path / "run"
    RunDirectory(out, fingerprint={"a": 1}).prepare().save_stage("importance", {"x": 1})
    run = RunDirectory(out, fingerprint={"a": 2}, force=True).prepare()
    assert run.load_stage("importance") is None
    assert not (out / "stages" / "importance.json").exists()


def test_force_and_resume_conflict(tmp_path):
    with pytest.raises(BadInput):
        RunDirectory(tmp_path, fingerprint={}, force=True, resume=True)
