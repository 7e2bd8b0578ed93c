"""Sessions: ``tests`` (CPU, from nothing), ``build`` (the distributions, in ``dist/``),
``lint``, ``typecheck``, ``gpu`` (on a CUDA machine)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"

#: Every distribution of the repository, the core first (the others depend on it).
DISTRIBUTIONS = [
    ".",
    "kernels",
    *sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.glob("plugins/*/pyproject.toml")),
]
TEST_ENV = {"HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1", "TOKENIZERS_PARALLELISM": "false"}


def _install_repo(session: nox.Session, *pip_args: str) -> None:
    editable = [arg for dist in DISTRIBUTIONS for arg in ("-e", dist)]
    session.install(*pip_args, "--no-build-isolation", *editable)


#: llama.cpp's Python bindings, for sloth-gguf's tests (they run it in a child process).
LLAMA_CPP_VERSION = "0.3.36"


def _install_llama_cpp(session: nox.Session) -> None:
    """Install llama-cpp-python from a wheel cached outside the repository, built once.

    The build takes minutes, so the wheel is kept in ``$SLOTH_WHEEL_CACHE`` (default
    ``~/.cache/sloth/wheels``), keyed by version. ``-DGGML_NATIVE=OFF``: a build tuned to
    the build machine's CPU dies with an illegal instruction on other (virtual) machines.
    """
    cache = Path(os.environ.get("SLOTH_WHEEL_CACHE", "~/.cache/sloth/wheels")).expanduser()
    pattern = f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"
    if not sorted(cache.glob(pattern)):
        cache.mkdir(parents=True, exist_ok=True)
        try:
            session.run(
                "python", "-m", "pip", "wheel", "--no-deps",
                f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-w", str(cache),
                env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF"},
            )  # fmt: skip
        except nox.command.CommandFailed:
            # No compiler or cmake here: the llama.cpp checks skip (and say why); the rest
            # of the suite still runs rather than nothing.
            session.warn("llama-cpp-python did not build: its tests will be skipped")
            return
    session.install(str(sorted(cache.glob(pattern))[-1]))


#: Test processes: one per core, at most 4 (each builds its own session fixtures). Each
#: file runs whole in one process, so its module fixtures (a trained run, exports) are
#: built once; torch gets one thread per process, so the processes do not oversubscribe.
WORKERS = int(os.environ.get("SLOTH_TEST_WORKERS", min(os.cpu_count() or 1, 4)))


#: Optional libraries that are quick to install, so that nothing but the GPU tests skips:
#: parquet and ``datasets.Dataset`` training data, ``loss.png``, and a sloth model in TRL's
#: own DPOTrainer (trl pinned: the version tests/train/test_trl_compat.py was written on;
#: it adds only itself, about 2 s).
LIGHT_EXTRAS = ("pyarrow>=14", "datasets>=3", "matplotlib>=3.8", "trl==1.16.0")
#: What building and checking the distributions takes (``build``, tests/test_distributions.py).
PACKAGING = ("build>=1.2", "twine>=6")


@nox.session
def tests(session: nox.Session) -> None:
    """CPU test suite in a fresh environment: torch first, so pip takes the CPU build."""
    session.install("torch==2.13.0")
    session.install(
        "setuptools>=77", "wheel", "pytest>=8", "pytest-xdist>=3.5", "bitsandbytes>=0.45",
        "triton>=3.6", *LIGHT_EXTRAS, *PACKAGING,
    )  # fmt: skip
    _install_repo(session)
    _install_llama_cpp(session)
    parallel = ["-n", str(WORKERS), "--dist", "loadfile"] if WORKERS > 1 else []
    env = {**TEST_ENV, **({"OMP_NUM_THREADS": "1"} if WORKERS > 1 else {})}
    session.run("pytest", "-m", "not gpu", *parallel, "--durations=40", *session.posargs, env=env)


#: The tests that compare the patched model with Hugging Face's (parity, convergence, the
#: parity harness's own checks): on a GPU they run real kernels at full batch size, bf16
#: bounds included, and assert which kernel served each op (check_plugin_parity).
MODEL_CHECKS = "parity or converg"


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """On a CUDA machine, in its own Python (its torch and triton), the repo installed in
    place: the ``gpu``-marked tests, then every parity and convergence test of the suite."""
    _install_repo(session, "--no-deps")
    env = {"HF_HUB_OFFLINE": "1"}
    session.run("pytest", "-m", "gpu", *session.posargs, env=env)
    session.run("pytest", "-m", "not gpu", "-k", MODEL_CHECKS, *session.posargs, env=env)


@nox.session
def build(session: nox.Session) -> None:
    """Wheels and sdists of every distribution in ``dist/`` (each wheel built from its
    sdist, in a copy, so the clone gets no ``build/``), then ``twine check`` on them."""
    session.install("setuptools>=77", "wheel", *PACKAGING)
    out = ROOT / "dist"
    shutil.rmtree(out, ignore_errors=True)  # only this build's files, none of an older one
    session.run("python", str(ROOT / "scripts" / "build_dists.py"), "--out", str(out),
                *session.posargs)  # fmt: skip
    files = sorted(str(p) for p in out.iterdir())
    session.run("twine", "check", "--strict", *files)
    session.log(f"{len(files)} files in {out}: publish with `twine upload {out}/*`")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy (``[tool.mypy]`` of pyproject.toml) on the core, the kernels and every plugin.

    Checked against the libraries' own types: the repo is installed with its dependencies,
    torch first (the CPU build), and mypy pinned, so that a new release adds no errors.
    """
    session.install("torch==2.13.0")
    session.install("setuptools>=77", "wheel", "mypy==2.4.1")
    _install_repo(session)
    session.run("mypy", *session.posargs)
