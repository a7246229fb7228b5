"""Where a model comes from, and its fingerprint.

A model spec is ``bundled`` (the byte-level model shipped in this package),
a local directory, an fsspec URL of a saved model directory (copied once to a
local cache), or a Hugging Face hub id (for users with network access).
The bundled spec is resolved on each worker, because the package may be
installed at a different path there than on the machine that launched the job.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

import fsspec

BUNDLED = "bundled"
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")


def bundled_model_dir() -> Path:
    return Path(str(resources.files("lmc_audit.pipelines") / "assets" / "model"))


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(spec))


def validate_model_spec(spec: str) -> None:
    """Fails at once, with what to fix, for a model that cannot be there."""
    if not spec:
        raise ValueError("--model is empty: pass 'bundled', a model directory, an fsspec URL or a hub id")
    if spec == BUNDLED:
        if not (bundled_model_dir() / "config.json").exists():
            raise FileNotFoundError(f"the bundled model is missing from {bundled_model_dir()}; reinstall lmc-audit")
        return
    if "://" in spec:
        fs, root = fsspec.core.url_to_fs(spec)
        if not fs.exists(root.rstrip("/") + "/config.json"):
            raise FileNotFoundError(f"model URL {spec} holds no config.json: point --model at a directory "
                                    "written by save_pretrained()")
        return
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {spec} does not exist: pass --model a directory written by "
                                    "save_pretrained(), 'bundled', or a hub id")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model directory {spec} has no config.json: is it a save_pretrained() directory?")


def resolve_model_dir(spec: str, cache_dir: str | None = None) -> str:
    """A local directory (or a hub id) that from_pretrained can load."""
    if spec == BUNDLED:
        return str(bundled_model_dir())
    if "://" in spec:
        fs, root = fsspec.core.url_to_fs(spec)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol in ("file", "local"):
            return root
        cache = Path(cache_dir or os.environ.get("LMC_AUDIT_CACHE", Path.home() / ".cache" / "lmc_audit"))
        local = cache / "models" / hashlib.sha256(spec.encode()).hexdigest()[:16]
        if not (local / ".complete").exists():
            _fetch_model(fs, root, local, spec)
        return str(local)
    if _looks_like_path(spec):
        return str(Path(spec).expanduser().resolve())
    return spec  # a hub id


def _fetch_model(fs, root: str, local: Path, spec: str) -> None:
    """Copies a remote model into the cache atomically: under a lock (processes on one machine fetch it
    once), into a temporary folder renamed into place, so a killed copy never looks complete."""
    import fcntl
    import shutil
    import tempfile

    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.parent / f".{local.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (local / ".complete").exists():
            return  # another process fetched it while this one waited
        staging = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
        try:
            fs.get(root.rstrip("/") + "/", str(staging) + "/", recursive=True)
            (staging / ".complete").write_text(spec)
            if local.exists():
                shutil.rmtree(local)  # an incomplete copy from an older release
            staging.rename(local)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def model_fingerprint(model_dir: str) -> str:
    """sha256 over the config, the weights and the tokenizer files, by name."""
    path = Path(model_dir)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model_dir))
    names = sorted(n for n in os.listdir(path) if n in MODEL_FILES or n.endswith(".safetensors"))
    outer = hashlib.sha256()
    for name in names:
        h = hashlib.sha256()
        with open(path / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        outer.update(f"{name}\0{h.hexdigest()}\n".encode())
    return outer.hexdigest()
