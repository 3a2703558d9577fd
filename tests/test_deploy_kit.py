"""The deploy kit (Dockerfile, deploy/compose.yaml, deploy/ci/*) agrees with the CLI, pyproject and profiles.

No docker here, so nothing is built or pulled. What can drift is checked instead: every `compress`
command line in the templates is parsed by the real click CLI (a renamed or misspelt flag fails here,
not on the device), the Dockerfile installs what pyproject.toml and the Makefile define, every target
named exists in profiles/, and the CI templates' shell logic is run with a stand-in `docker` that
exits 0, 3 or 2, so the exit-code handling the jobs rely on is executed, not just read.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shlex
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import yaml

from compressor.cli import cli, main
from deploy.errors import BadInput
from deploy.profiles import list_profiles, load_profile
from deploy.target_check import check_target_available, run_on_device_hint

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "deploy" / "compose.yaml"
GITHUB = REPO / "deploy" / "ci" / "github-actions.yml"
GITLAB = REPO / "deploy" / "ci" / "gitlab-ci.yml"
IMAGE_REPO = "edge-compressor"

# Sample values for variables a template may use without defining them itself (a template's own
# env/variables block, or a ${X:-default}, takes precedence). An unknown variable fails the test.
SAMPLES = {
    "MODEL": "resnet20",
    "WEIGHTS": "weights/resnet20.pt",
    "DATA": "digits",
    "TARGET": "jetson-orin",
    "LATENCY_MS": "5",
    "MAX_LATENCY_MS": "5",
    "MAX_ACCURACY_DROP": "0.01",
    "OUT": "runs/ci",
    "PWD": "/work",
}

# TensorRT version of the base images the Dockerfile may name (NGC release notes; JetPack 6 = 10.3).
BASE_IMAGE_TENSORRT = {
    "nvcr.io/nvidia/pytorch:24.10-py3": "10.5",
    "nvcr.io/nvidia/pytorch:24.10-py3-igpu": "10.5",
    "nvcr.io/nvidia/tensorrt:24.10-py3": "10.5",
    "nvcr.io/nvidia/l4t-jetpack:r36.4.0": "10.3",
}

SECRET_WORDS = {"TOKEN", "PASSWORD", "PASSWD", "SECRET", "KEY", "APIKEY", "CREDENTIAL", "CREDENTIALS", "PAT"}


# ----------------------------------------------------------------------------- parsing helpers


def parse_compress_args(args: list[str]) -> click.Context:
    """Parse a `compress` argument list exactly as the CLI would, without running anything.

    The main job's options are parsed by the group; what is left names a subcommand, which then
    parses the rest. An unknown flag, a bad choice or a stray argument raises click.UsageError.
    """
    ctx = cli.make_context("compress", list(args), resilient_parsing=False)
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    if not rest:
        return ctx  # the main job
    name, *sub_args = rest
    command = cli.get_command(ctx, name)
    if command is None:
        raise click.UsageError(f"no such command {name!r}", ctx)
    return command.make_context(name, sub_args, parent=ctx, resilient_parsing=False)


_VAR = re.compile(r"\$(?:\{(\w+)(?::?-([^}]*))?\}|(\w+))")
_GH_EXPR = re.compile(r"\$\{\{\s*(?:env|vars|inputs)\.(\w+)\s*\}\}")


def substitute(text: str, values: dict[str, str]) -> str:
    """Expand $X, ${X}, ${X:-default} and ${{ env.X }}: the template's value, its default, else SAMPLES."""

    def value(name: str, default: str | None) -> str:
        if name in values:
            return values[name]
        if default is not None:
            return default
        if name in SAMPLES:
            return SAMPLES[name]
        raise AssertionError(f"no value for ${name}: define it in the template or add a sample to SAMPLES")

    text = _GH_EXPR.sub(lambda m: value(m.group(1), None), text)
    return _VAR.sub(lambda m: value(m.group(1) or m.group(3), m.group(2)), text)


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell script as word lists: comments dropped, continuations joined,
    split at ; && || | ( ), redirection targets dropped (`cat > x/compress` does not run compress).
    Quotes are removed, $variables are left as text."""
    script = re.sub(r"\\\n", " ", script)
    commands: list[list[str]] = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        redirect = False
        for token in lexer:
            if token and set(token) <= set(";&|()<>"):
                if "<" in token or ">" in token:
                    redirect = True  # the next word is a file (or a here-document's delimiter)
                    continue
                if words:
                    commands.append(words)
                words = []
            elif redirect:
                redirect = False
            else:
                words.append(token)
        if words:
            commands.append(words)
    return commands


@dataclass
class CompressCall:
    """One `compress ...` invocation found in a template, with its variables substituted."""

    source: str
    args: list[str]
    ctx: click.Context | None = field(default=None, repr=False)

    def parse(self) -> click.Context:
        try:
            self.ctx = parse_compress_args(self.args)
        except click.UsageError as exc:
            raise AssertionError(f"{self.source}: `compress {shlex.join(self.args)}`: {exc.format_message()}") from exc
        return self.ctx

    @property
    def subcommand(self) -> str | None:
        return self.ctx.info_name if self.ctx is not None and self.ctx.parent is not None else None


def calls_in_script(script: str, values: dict[str, str], source: str) -> list[CompressCall]:
    script = _GH_EXPR.sub(lambda m: substitute(m.group(0), values), script)
    calls = []
    for words in shell_commands(script):
        if words[0] == "compress" or words[0].endswith("/compress"):
            calls.append(CompressCall(source, [substitute(w, values) for w in words[1:]]))
    return calls


def _stringify(env: dict | None) -> dict[str, str]:
    out = {}
    for name, value in (env or {}).items():
        if isinstance(value, dict):  # GitLab's {value: ..., description: ...}
            value = value.get("value", "")
        out[str(name)] = "" if value is None else str(value)
    return out


def load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def github_calls(workflow: dict) -> list[CompressCall]:
    calls = []
    for job_id, job in workflow["jobs"].items():
        for i, step in enumerate(job["steps"]):
            if "run" not in step:
                continue
            values = {**_stringify(workflow.get("env")), **_stringify(job.get("env")), **_stringify(step.get("env"))}
            source = f"{GITHUB.name}: job {job_id}, step {step.get('name', i)!r}"
            calls += calls_in_script(step["run"], values, source)
    return calls


def gitlab_jobs(pipeline: dict) -> dict[str, dict]:
    reserved = {"variables", "stages", "default", "include", "workflow", "image", "services", "cache",
                "before_script", "after_script"}
    return {name: job for name, job in pipeline.items()
            if name not in reserved and not name.startswith(".") and isinstance(job, dict)}


def gitlab_values(pipeline: dict, job: dict) -> dict[str, str]:
    return {**_stringify(pipeline.get("variables")), **_stringify(job.get("variables"))}


def gitlab_calls(pipeline: dict) -> list[CompressCall]:
    calls = []
    for name, job in gitlab_jobs(pipeline).items():
        values = gitlab_values(pipeline, job)
        for key in ("before_script", "script", "after_script"):
            for line in job.get(key, []):
                calls += calls_in_script(line, values, f"{GITLAB.name}: job {name}, {key}")
    return calls


def compose_calls(compose: dict) -> dict[str, CompressCall]:
    """The command of every service (the image's ENTRYPOINT is compress)."""
    out = {}
    for name, service in compose["services"].items():
        command = service["command"]
        args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        out[name] = CompressCall(f"{COMPOSE.name}: service {name}", [substitute(a, {}) for a in args])
    return out


# ----------------------------------------------------------------------------- Dockerfile helpers


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (even inside a continuation) dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, value = full.partition(" ")
        out.append(Instruction(keyword.upper(), value.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return out


def dockerfile_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults (the first declaration with a value wins, as Docker's global scope does)."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, eq, default = ins.value.partition("=")
            if eq and name not in args:
                args[name] = default.strip().strip('"')
    return args


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for word in shlex.split(ins.value):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def exec_form(value: str) -> list[str]:
    parsed = yaml.safe_load(value)  # a JSON array is valid YAML
    assert isinstance(parsed, list), f"not the exec (JSON array) form: {value}"
    return [str(v) for v in parsed]


def dockerfile_comment_commands(text: str) -> list[list[str]]:
    """`docker ...` commands quoted in the Dockerfile's comments (the build and run examples)."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") and re.match(r"#\s+docker ", line):
            command = line.lstrip("#").split("  #")[0]  # drop a trailing "   # remark"
            out.append(shlex.split(command, comments=True))
    return out


def image_and_args(words: list[str]) -> tuple[str, list[str]]:
    """Split `docker run [flags] IMAGE ARGS...` at the edge-compressor image."""
    for i, word in enumerate(words):
        if word.startswith(f"{IMAGE_REPO}:"):
            return word, words[i + 1:]
    raise AssertionError(f"no {IMAGE_REPO}:TAG image in: {shlex.join(words)}")


def built_tags(text: str, default_base: str) -> dict[str, str]:
    """{BASE: tag} from the `docker build` examples in the Dockerfile's header."""
    tags = {}
    for words in dockerfile_comment_commands(text):
        if words[:2] != ["docker", "build"]:
            continue
        base = default_base
        for i, word in enumerate(words):
            if word == "--build-arg" and words[i + 1].startswith("BASE="):
                base = words[i + 1].split("=", 1)[1]
        tags[base] = words[words.index("-t") + 1]
    return tags


def secret_like(name: str, value: str = "") -> bool:
    """A variable name or value that looks like it carries a credential."""
    parts = set(re.split(r"[_\W]+", name.upper()))
    if parts & SECRET_WORDS:
        return True
    return bool(re.search(r"(ghp_|glpat-|nvapi-|AKIA)[A-Za-z0-9]", value))


def makefile_torch_pin() -> str:
    match = re.search(r"^TORCH\s*\??=\s*(\S+)", (REPO / "Makefile").read_text(), flags=re.MULTILINE)
    assert match, "Makefile has no TORCH pin"
    return match.group(1).strip('"')


def optional_dependencies() -> dict[str, list[str]]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["optional-dependencies"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def instructions(dockerfile_text) -> list[Instruction]:
    return dockerfile_instructions(dockerfile_text)


@pytest.fixture(scope="module")
def workflow() -> dict:
    return load_yaml(GITHUB)


@pytest.fixture(scope="module")
def pipeline() -> dict:
    return load_yaml(GITLAB)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """No ./compress.yaml from wherever pytest runs may leak into a parsed or run command."""
    monkeypatch.chdir(tmp_path)


def _all_calls(workflow, pipeline, compose, dockerfile_text, instructions) -> list[CompressCall]:
    calls = github_calls(workflow) + gitlab_calls(pipeline) + list(compose_calls(compose).values())
    cmd = [exec_form(i.value) for i in instructions if i.keyword == "CMD"][-1]
    calls.append(CompressCall("Dockerfile CMD", cmd))
    for words in dockerfile_comment_commands(dockerfile_text):
        if words[:2] == ["docker", "run"]:
            calls.append(CompressCall("Dockerfile example", image_and_args(words)[1]))
    return calls


# ----------------------------------------------------------------------------- (a) structure


def test_templates_parse_as_yaml_with_the_expected_structure(workflow, pipeline, compose):
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers and not {"pull_request", "pull_request_target"} & set(triggers), \
        "a self-hosted device runner must not run pull requests (a fork's code would run on the device)"
    assert workflow["permissions"].get("checks") == "write", "the JUnit report is published as a check run"
    for job in workflow["jobs"].values():
        assert "self-hosted" in job["runs-on"]
        assert any("run" in s for s in job["steps"]) and job["steps"][0]["uses"].startswith("actions/checkout@")
        uses = {s["uses"].split("@")[0]: s for s in job["steps"] if "uses" in s}
        upload, reporter = uses["actions/upload-artifact"], uses["dorny/test-reporter"]
        assert "always()" in upload["if"] and "always()" in reporter["if"], "artifacts must be kept on failure too"
        assert reporter["with"]["reporter"] == "java-junit"

    jobs = gitlab_jobs(pipeline)
    assert jobs
    for job in jobs.values():
        assert "self-hosted" in job["tags"]
        assert job["stage"] in pipeline["stages"]
        assert job["artifacts"]["when"] == "always"
        assert job["artifacts"]["reports"]["junit"]

    services = compose["services"]
    assert set(services) == {"jetson", "cuda"}
    assert services["jetson"]["runtime"] == "nvidia"
    devices = services["cuda"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for service in services.values():
        mounts = {_mount_target(str(v)) for v in service["volumes"]}
        assert {"/work", "/cache"} <= mounts
        assert service["working_dir"] == "/work"
        assert service["environment"]["COMPRESS_CACHE_DIR"] == "/cache"
    assert "compress-cache" in compose["volumes"]


def test_ci_jobs_keep_and_publish_what_the_commands_write(workflow, pipeline):
    """The report the gate reads is the one compress wrote; the JUnit file the gate writes is the one
    published and kept; the run folder is kept as an artifact. Paths are taken from the parsed commands."""
    for calls, published, kept in (
        (github_calls(workflow), *_github_outputs(workflow)),
        (gitlab_calls(pipeline), *_gitlab_outputs(pipeline)),
    ):
        by_name = {}
        for call in calls:
            call.parse()
            by_name.setdefault(call.subcommand, []).append(call.ctx.params)
        (job,), (gate,) = by_name[None], by_name["gate"]
        assert gate["report_file"] == job["out"] / "report.json"
        assert str(gate["junit"]) == published
        assert {str(job["out"]).rstrip("/"), str(gate["junit"])} <= {k.rstrip("/") for k in kept}


def _mount_target(volume: str) -> str:
    """`SOURCE:TARGET[:MODE]` -> TARGET; SOURCE may hold a ${X:-default} with its own colon."""
    parts = volume.split(":")
    if parts[-1] in {"ro", "rw", "z", "Z", "cached", "delegated"}:
        parts = parts[:-1]
    return parts[-1]


def _github_outputs(workflow) -> tuple[str, set[str]]:
    (job,) = workflow["jobs"].values()
    values = _stringify(workflow.get("env")) | _stringify(job.get("env"))
    steps = {s["uses"].split("@")[0]: s for s in job["steps"] if "uses" in s}
    published = substitute(steps["dorny/test-reporter"]["with"]["path"], values)
    kept = {substitute(p.strip(), values) for p in steps["actions/upload-artifact"]["with"]["path"].splitlines()}
    return published, {k for k in kept if k}


def _gitlab_outputs(pipeline) -> tuple[str, set[str]]:
    (job,) = gitlab_jobs(pipeline).values()
    values = gitlab_values(pipeline, job)
    artifacts = job["artifacts"]
    return substitute(artifacts["reports"]["junit"], values), {substitute(p, values) for p in artifacts["paths"]}


# ----------------------------------------------------------------------------- (b) command lines


def test_every_compress_command_in_the_kit_parses_with_the_cli(workflow, pipeline, compose, dockerfile_text,
                                                                instructions):
    calls = _all_calls(workflow, pipeline, compose, dockerfile_text, instructions)
    for call in calls:
        call.parse()
    sources = {c.source.split(":")[0] for c in calls}
    assert {GITHUB.name, GITLAB.name, COMPOSE.name, "Dockerfile CMD", "Dockerfile example"} <= sources
    subcommands = [c.subcommand for c in calls]
    assert subcommands.count("gate") == 2 and None in subcommands and "doctor" in subcommands
    for call in calls:  # the main job always states its target and budget
        if call.subcommand is None:
            assert call.ctx.params["target"] and call.ctx.params["latency_ms"], call.source


@pytest.mark.parametrize("args", [
    ["--target", "cpu", "--latency-msec", "5"],            # misspelt main-job flag
    ["--target", "cpu", "--importance", "hsic"],           # not one of the choices
    ["gate", "r.json", "--max-latency", "5"],              # flag of the wrong length
    ["gate", "r.json", "extra.json"],                      # stray argument
    ["gates", "r.json"],                                   # no such subcommand
])
def test_a_wrong_command_line_fails_to_parse(args):
    with pytest.raises(click.UsageError):
        parse_compress_args(args)


def test_a_wrong_flag_in_a_template_fails_the_kit_check(workflow):
    """The whole path (YAML -> script -> words -> variables -> click) catches a renamed flag."""
    job_id = next(iter(workflow["jobs"]))
    broken = yaml.safe_load(yaml.safe_dump(workflow))
    for step in broken["jobs"][job_id]["steps"]:
        if "run" in step:
            step["run"] = step["run"].replace("--max-accuracy-drop", "--max-acc-drop")
    calls = github_calls(broken)
    with pytest.raises(AssertionError, match="--max-acc-drop"):
        for call in calls:
            call.parse()


def test_an_undefined_template_variable_is_reported():
    with pytest.raises(AssertionError, match=r"\$BUDGET_MS"):
        calls_in_script('compress --target cpu --latency-ms "$BUDGET_MS"', {}, "inline")


# ----------------------------------------------------------------------------- (c) Dockerfile vs pyproject


def test_dockerfile_installs_pinned_torch_first_then_the_package_with_real_extras(instructions):
    args = dockerfile_args(instructions)
    assert args["TORCH"] == makefile_torch_pin(), "the Dockerfile's torch pin must be the Makefile's TORCH"
    runs = [i.value for i in instructions if i.keyword == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if re.search(r'pip install [^;&|]*"\$TORCH"', r))
    package_run = next(i for i, r in enumerate(runs)
                       if re.search(r'pip install [^;&|]*"\.(\$\{extras:\+\[\$extras\]\}|\[[\w,-]+\])?"', r))
    assert torch_run < package_run, "torch must be installed before the package (an unpinned torch is multi-GB)"
    assert "$X86_EXTRAS" in runs[package_run] and "$JETSON_EXTRAS" in runs[package_run]
    extras = optional_dependencies()
    literal = re.findall(r'"\.\[([\w,-]+)\]"', runs[package_run])
    for value in [args.get("X86_EXTRAS", ""), args.get("JETSON_EXTRAS", ""), *literal]:
        for name in filter(None, value.split(",")):
            assert name in extras, f"extra {name!r} is not in pyproject's [project.optional-dependencies]"
    # the x86 image measures the discrete-GPU profiles: it needs the extra of their backend
    needs = {"tensorrt": "tensorrt", "onnxruntime-tensorrt": "gpu", "onnxruntime-cuda": "gpu"}
    for profile in list_profiles():
        if profile.device_match["kind"] == "nvidia-gpu" and profile.backend in needs:
            assert needs[profile.backend] in args["X86_EXTRAS"].split(","), profile.name


def test_dockerfile_bases_entrypoint_user_workdir_and_volumes(instructions, dockerfile_text):
    args = dockerfile_args(instructions)
    froms = [i.value.split() for i in instructions if i.keyword == "FROM"]
    stages = {f[2] for f in froms if len(f) == 3 and f[1].upper() == "AS"}
    assert froms[-1][0] == "base-${BASE}" and {"base-x86", "base-jetson"} <= stages
    assert f"base-{args['BASE']}" in stages
    minimum = next(r for r in optional_dependencies()["tensorrt"] if r.startswith("tensorrt"))
    minimum = tuple(int(p) for p in minimum.split(">=")[1].split("."))
    for name in ("X86_IMAGE", "JETSON_IMAGE"):
        image = args[name]
        assert image in BASE_IMAGE_TENSORRT, f"{image}: add its TensorRT version to BASE_IMAGE_TENSORRT"
        trt = tuple(int(p) for p in BASE_IMAGE_TENSORRT[image].split("."))
        assert trt >= minimum, f"{image} has TensorRT {trt}, pyproject needs >= {minimum}"

    assert exec_form([i for i in instructions if i.keyword == "ENTRYPOINT"][-1].value) == ["compress"]
    user = [i.value for i in instructions if i.keyword == "USER"][-1].split(":")[0]
    assert user not in {"root", "0", ""}, "the image must run as a non-root user"
    assert any(re.search(rf"useradd\b.*\b{re.escape(user)}\b", i.value) for i in instructions if i.keyword == "RUN")
    assert [i.value for i in instructions if i.keyword == "WORKDIR"][-1] == "/work"
    volumes = set(exec_form([i for i in instructions if i.keyword == "VOLUME"][-1].value))
    env = dockerfile_env(instructions)
    assert env["COMPRESS_CACHE_DIR"] == "/cache" and {"/cache", "/work"} <= volumes
    # profiles/ is not package data: the image must point COMPRESS_PROFILES_DIR at a copy of it
    workdir, copies = "/", {}
    for ins in instructions:
        if ins.keyword == "WORKDIR":
            workdir = ins.value
        elif ins.keyword == "COPY":
            *sources, dest = ins.value.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                copies[src.rstrip("/")] = os.path.normpath(os.path.join(workdir, dest))
    assert copies.get("profiles") == env["COMPRESS_PROFILES_DIR"]
    assert {"pyproject.toml", "compressor", "deploy"} <= set(copies)


def test_no_secrets_in_the_image_or_the_templates(instructions, workflow, pipeline):
    found = []
    for ins in instructions:
        if ins.keyword in {"ARG", "ENV"}:
            for word in shlex.split(ins.value):
                name, _, value = word.partition("=")
                if secret_like(name, value):
                    found.append(f"Dockerfile {ins.keyword} {name}")
    for name, value in {**_stringify(workflow.get("env")), **_stringify(pipeline.get("variables"))}.items():
        if secret_like(name, value):
            found.append(f"template variable {name}")
    assert not found, f"secret-looking variables: {found}"
    # the check itself catches what it is meant to
    assert secret_like("NGC_API_KEY") and secret_like("HF_TOKEN") and secret_like("X", "ghp_abc123")
    assert not secret_like("MAX_LATENCY_MS", "5") and not secret_like("COMPRESS_CACHE_DIR", "/cache")


def test_dockerignore_keeps_local_state_out_and_the_build_inputs_in():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for needed in (".venv", "runs", ".git", "**/__pycache__", ".pytest_cache"):
        assert needed in patterns, needed

    def ignored(path: str) -> bool:
        parts = path.split("/")
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p.removeprefix("**/"))
                   for p in patterns if not p.startswith("!"))

    for path in ("pyproject.toml", "README.md", "compressor", "deploy", "profiles", "compressor/cli.py",
                 "profiles/cpu.yaml", "Dockerfile"):
        assert not ignored(path), f".dockerignore excludes {path}, which the image build needs"
    assert ignored("runs/x/report.json") and ignored(".venv") and ignored("model.onnx")


# ----------------------------------------------------------------------------- (d) targets


def test_every_target_the_kit_names_is_a_profile(workflow, pipeline, compose, dockerfile_text, instructions):
    targets = set()
    for call in _all_calls(workflow, pipeline, compose, dockerfile_text, instructions):
        call.parse()
        target = call.ctx.params.get("target")
        if target:
            targets.add(target)
    targets |= {_stringify(workflow["env"])["TARGET"], _stringify(pipeline["variables"])["TARGET"]}
    assert targets
    for target in targets:
        load_profile(target)  # BadInput names the unknown target


def test_runners_and_services_sit_on_the_device_their_target_names(workflow, pipeline, compose):
    def profiles_named(labels) -> set[str]:
        names = set()
        for label in labels:
            try:
                names.add(load_profile(str(label)).name)
            except BadInput:
                pass  # self-hosted, linux, ARM64, ...
        return names

    for labels, values in ((job["runs-on"], _stringify(workflow["env"]) | _stringify(job.get("env")))
                           for job in workflow["jobs"].values()):
        assert load_profile(values["TARGET"]).name in profiles_named(labels), labels
    for job in gitlab_jobs(pipeline).values():
        assert load_profile(gitlab_values(pipeline, job)["TARGET"]).name in profiles_named(job["tags"])

    kinds = {"jetson": "jetson", "cuda": "nvidia-gpu"}
    for name, call in compose_calls(compose).items():
        profile = load_profile(call.parse().params["target"])
        assert profile.device_match["kind"] == kinds[name], f"service {name} runs target {profile.name}"


# ----------------------------------------------------------------------------- (e) off-device


@pytest.mark.parametrize(("target", "device", "image", "gpu_flag"), [
    ("jetson-orin", "a Jetson AGX Orin", f"{IMAGE_REPO}:jetson", "--runtime nvidia"),
    ("h100", "an NVIDIA H100 GPU", f"{IMAGE_REPO}:cuda", "--gpus"),
])
def test_a_device_target_off_device_exits_2_with_the_container_command(tmp_path, capsys, target, device, image,
                                                                       gpu_flag):
    profile = load_profile(target)
    try:
        check_target_available(profile)
        pytest.skip(f"this host is a {profile.name}")
    except BadInput:
        pass
    out = tmp_path / "run"
    code = main(["--model", "resnet20", "--data", "digits", "--target", target, "--latency-ms", "5",
                 "--out", str(out)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: target {profile.name} needs TensorRT on {device}"), lines[0]
    hint = lines[0][lines[0].index("docker run"):]
    assert gpu_flag in hint and image_and_args(shlex.split(hint))[0] == image
    assert not out.exists(), "a refused run must not create its --out folder"


def test_the_hints_name_the_images_the_build_instructions_produce(dockerfile_text, instructions, compose):
    tags = built_tags(dockerfile_text, dockerfile_args(instructions)["BASE"])
    assert tags == {"x86": f"{IMAGE_REPO}:cuda", "jetson": f"{IMAGE_REPO}:jetson"}
    services = compose["services"]
    assert services["cuda"]["image"] == tags["x86"] and services["cuda"]["build"]["args"]["BASE"] == "x86"
    assert services["jetson"]["image"] == tags["jetson"] and services["jetson"]["build"]["args"]["BASE"] == "jetson"
    for words in dockerfile_comment_commands(dockerfile_text):
        if words[:2] == ["docker", "run"]:
            assert image_and_args(words)[0] in tags.values()
    hinted = {kind: image_and_args(shlex.split(run_on_device_hint(p)))[0]
              for kind in ("jetson", "nvidia-gpu")
              for p in list_profiles() if p.device_match["kind"] == kind}
    assert hinted == {"jetson": tags["jetson"], "nvidia-gpu": tags["x86"]}
    readme_tags = set(re.findall(rf"{IMAGE_REPO}:[\w.-]+", (REPO / "README.md").read_text()))
    assert readme_tags <= set(tags.values()), f"README names images no build produces: {readme_tags}"


def test_the_hint_runs_under_the_images_entrypoint():
    """The image's ENTRYPOINT is compress, so the hint's arguments must parse as compress's own."""
    for profile in (load_profile("jetson-orin"), load_profile("h100")):
        _, args = image_and_args(shlex.split(run_on_device_hint(profile)))
        args = [a for a in args if a != "..."]  # the hint's placeholder for the rest of the job
        CompressCall(f"hint for {profile.name}", args).parse()


# ----------------------------------------------------------------------------- CI shell logic, run


FAKE_DOCKER = r"""#!/usr/bin/env bash
# Stand-in for docker: records each call; `run IMAGE ARGS` exits as compress would on the device.
printf '%s\n' "$(printf '%q ' "$@")" >> "$FAKE_DOCKER_LOG"
[ "$1" = run ] || exit 0
shift
while [ $# -gt 0 ] && [ "$1" != "$COMPRESS_IMAGE" ]; do shift; done
shift
case "$1" in
  gate) exit "${FAKE_GATE_EXIT:-0}" ;;
  doctor) exit 0 ;;
  *) exit "${FAKE_JOB_EXIT:-0}" ;;
esac
"""


@dataclass
class ShellRun:
    name: str
    code: int | None  # None: skipped
    output: str


def _fake_docker(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, log = tmp_path / "fakebin", tmp_path / "docker.log"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(docker.stat().st_mode | stat.S_IEXEC)
    log.touch()
    return bin_dir, log


def _docker_runs(log: Path) -> list[list[str]]:
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    return [c for c in calls if c and c[0] == "run"]


def run_github_job(workflow: dict, tmp_path: Path, job_exit: int, gate_exit: int) -> tuple[list[ShellRun], Path]:
    """Run the job's `run` steps the way the runner does (bash -eo pipefail per step, env from the
    workflow/job/step, GITHUB_PATH/GITHUB_OUTPUT files, `if: always()` after a failure)."""
    (job,) = workflow["jobs"].values()
    bin_dir, log = _fake_docker(tmp_path)
    workspace, runner_temp = tmp_path / "ws", tmp_path / "runner-temp"
    workspace.mkdir()
    runner_temp.mkdir()
    files = {k: tmp_path / k.lower() for k in ("GITHUB_PATH", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY")}
    for f in files.values():
        f.touch()
    path = f"{bin_dir}:{os.environ['PATH']}"
    failed, results = False, []
    for i, step in enumerate(job["steps"]):
        name = step.get("name", step.get("uses", str(i)))
        condition = step.get("if")
        if condition is not None and "always()" not in condition:
            raise NotImplementedError(f"step {name!r}: condition {condition!r} is beyond this emulation")
        if "run" not in step or (failed and condition is None):
            results.append(ShellRun(name, None, ""))
            continue
        values = _stringify(workflow.get("env")) | _stringify(job.get("env")) | _stringify(step.get("env"))
        extra = [p for p in files["GITHUB_PATH"].read_text().splitlines() if p]
        env = {**os.environ, **values, **{k: str(v) for k, v in files.items()}, "RUNNER_TEMP": str(runner_temp),
               "PATH": ":".join([*reversed(extra), path]), "FAKE_DOCKER_LOG": str(log),
               "FAKE_JOB_EXIT": str(job_exit), "FAKE_GATE_EXIT": str(gate_exit)}
        script = tmp_path / f"step{i}.sh"
        script.write_text(step["run"])
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=workspace,
                              env=env, capture_output=True, text=True, timeout=30)
        results.append(ShellRun(name, proc.returncode, proc.stdout + proc.stderr))
        failed = failed or proc.returncode != 0
    return results, log


def run_gitlab_job(pipeline: dict, tmp_path: Path, job_exit: int, gate_exit: int) -> tuple[ShellRun, Path]:
    """Run before_script + script as the shell executor does: one bash, `set -eo pipefail`."""
    (job,) = gitlab_jobs(pipeline).values()
    bin_dir, log = _fake_docker(tmp_path)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    script = tmp_path / "job.sh"
    script.write_text("set -eo pipefail\n" + "\n".join([*job["before_script"], *job["script"]]) + "\n")
    env = {**os.environ, **gitlab_values(pipeline, job), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "FAKE_DOCKER_LOG": str(log), "FAKE_JOB_EXIT": str(job_exit), "FAKE_GATE_EXIT": str(gate_exit)}
    proc = subprocess.run(["bash", "--noprofile", "--norc", str(script)], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=30)
    return ShellRun("job", proc.returncode, proc.stdout + proc.stderr), log


def _check_container_calls(log: Path, image: str, gpu_flags: str) -> None:
    """What reaches `docker run`: the device flags, the mounts, the image, and CLI-valid arguments."""
    runs = _docker_runs(log)
    assert runs
    for words in runs:
        joined = shlex.join(words)
        assert shlex.join(shlex.split(gpu_flags)) in joined
        assert "-v compress-cache:/cache" in joined and "-w /work" in joined and ":/work" in joined
        found, args = image_and_args(words)
        assert found == image
        CompressCall("docker run from the CI wrapper", args).parse()


def test_github_job_passes_when_the_budget_is_met(workflow, tmp_path):
    results, log = run_github_job(workflow, tmp_path, job_exit=0, gate_exit=0)
    ran = {r.name: r for r in results if r.code is not None}
    assert all(r.code == 0 for r in ran.values()), {r.name: r.output for r in ran.values() if r.code}
    assert {"Compress", "Gate", "Device check"} <= set(ran)
    values = _stringify(workflow["env"])
    _check_container_calls(log, values["COMPRESS_IMAGE"], values["DOCKER_GPU_FLAGS"])
    subcommands = [image_and_args(w)[1][0] for w in _docker_runs(log)]
    assert subcommands == ["doctor", "--model", "gate"]


def test_github_job_fails_with_a_clear_message_when_the_budget_is_missed(workflow, tmp_path):
    results, _ = run_github_job(workflow, tmp_path, job_exit=3, gate_exit=3)
    by_name = {r.name: r for r in results}
    assert by_name["Compress"].code == 0 and "::warning title=Latency budget missed::" in by_name["Compress"].output
    assert by_name["Gate"].code == 3 and "::error title=Deployment gate failed::" in by_name["Gate"].output
    assert by_name["Summary"].code == 0  # `if: always()` steps still run, so the report is kept


def test_github_job_stops_on_bad_input_before_the_gate(workflow, tmp_path):
    results, _ = run_github_job(workflow, tmp_path, job_exit=2, gate_exit=0)
    by_name = {r.name: r for r in results}
    assert by_name["Compress"].code == 2 and "::error title=compress failed (exit 2)::" in by_name["Compress"].output
    assert by_name["Gate"].code is None


@pytest.mark.parametrize(("job_exit", "gate_exit", "expected", "message"), [
    (0, 0, 0, None),
    (3, 3, 3, "ERROR: deployment gate failed"),
    (0, 3, 3, "ERROR: deployment gate failed"),
    (2, 0, 2, "ERROR: compress failed (exit 2)"),
])
def test_gitlab_job_exit_codes(pipeline, tmp_path, job_exit, gate_exit, expected, message):
    result, log = run_gitlab_job(pipeline, tmp_path, job_exit, gate_exit)
    assert result.code == expected, result.output
    if message:
        assert message in result.output
    values = gitlab_values(pipeline, next(iter(gitlab_jobs(pipeline).values())))
    _check_container_calls(log, values["COMPRESS_IMAGE"], values["DOCKER_GPU_FLAGS"])
    ran = [image_and_args(w)[1][0] for w in _docker_runs(log)]
    assert ran == (["doctor", "--model"] if job_exit == 2 else ["doctor", "--model", "gate"])
