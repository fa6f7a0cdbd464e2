"""Hugging Face weights <-> minigpt run directories (`minigpt convert`): torch + safetensors only.

`transformers` is never needed to read or write the files (tests use it to verify). The layouts:

    GPT-2    transformer.h.{i}.attn.c_attn (Conv1D, stored (in, out): transposed here), c_proj,
             mlp.c_fc, mlp.c_proj, ln_1, ln_2, wte, wpe, ln_f; the head is tied
    Llama    model.layers.{i}.self_attn.{q,k,v}_proj (concatenated into c_attn, in that order),
             o_proj, mlp.{gate,up}_proj (concatenated into c_fc: SwiGLU's gate, then up),
             down_proj, input_layernorm, post_attention_layernorm, embed_tokens, norm, lm_head

RoPE: Meta's original Llama checkpoints rotate interleaved channel pairs (2i, 2i+1); the HF
checkpoints are stored permuted so that rotate_half's pairs (i, i + D/2) apply, and minigpt's
apply_rope rotates (i, i + D/2) too. So q_proj/k_proj map over unchanged in both directions (a test
checks the logits against transformers); converting a raw Meta checkpoint would need the permutation.

Both commands write into a temporary sibling folder and rename it at the end: the output folder
appears complete or not at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from minigpt.analytic.flops import param_counts
from minigpt.analytic.memory import model_bytes
from minigpt.core.atomic import atomic_write, atomic_write_text
from minigpt.core.blocks import inventory
from minigpt.core.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig, config_from_json
from minigpt.core.device import check_fits
from minigpt.core.errors import UserError
from minigpt.core.files import check_regular, digest, read_regular
from minigpt.core.hf_config import hf_family, hf_from_model, hf_stop_token, is_hf_config, model_from_hf, read_json
from minigpt.data.tokenizer import MAX_TOKENIZER_BYTES, read_tokenizer
from minigpt.nn.weights import VOCAB_ROWS, WEIGHTS, read_weights, save_weights
from minigpt.run.files import commit_checkpoint, latest_checkpoint, load_latest, new_checkpoint_folder
from minigpt.run.load import check_tokenizer, load_run_weights

IGNORED_SUFFIXES = (".attn.masked_bias", "rotary_emb.inv_freq")  # buffers old checkpoints saved


def layout(c: ModelConfig, family: str) -> list[tuple[str, list[tuple[str, tuple]], str]]:
    """(minigpt name, [(HF name, HF shape), ...], how), read from the `hf` names of the model's inventory
    (core/blocks.py): how is "copy", "T" (GPT-2's Conv1D stores (in, out)) or "cat" (a fused weight's
    blocks, concatenated along dim 0). GPT-2 has every bias; one the model lacks is written as zeros."""
    inv, out = inventory(c), []
    before = [p for p in inv.root if p.kind == "embedding"]
    after = [p for p in inv.root if p.kind != "embedding"]
    for part in before:
        out += _part_layout(c, part, family, "")
    for i in range(c.n_layer):
        for part in inv.layer:
            out += _part_layout(c, part, family, f"blocks.{i}.", i)
    for part in after:
        out += _part_layout(c, part, family, "")
    return out


def _part_layout(c: ModelConfig, part, family: str, prefix: str, i: int = 0) -> list:
    names = [n.format(i=i) for n in part.hf.get(family, ())]
    if not names or not part.shape:
        return []
    rows = c.vocab_size if part.hf_rows else part.shape[0]
    if len(names) > 1:  # a fused weight: its blocks are separate HF tensors
        weight = ([(f"{n}.weight", (r, part.shape[1])) for n, r in zip(names, part.fused)], "cat")
        bias = [(f"{n}.bias", (r,)) for n, r in zip(names, part.fused)]
    elif family == "gpt2" and part.kind == "linear" and part.name != "lm_head":
        weight = ([(f"{names[0]}.weight", (part.shape[1], rows))], "T")
        bias = [(f"{names[0]}.bias", (rows,))]
    else:
        weight = ([(f"{names[0]}.weight", (rows,) + tuple(part.shape[1:]))], "copy")
        bias = [(f"{names[0]}.bias", (rows,))]
    out = [(f"{prefix}{part.name}.weight", *weight)]
    if part.bias or (family == "gpt2" and part.kind in ("norm", "linear") and part.name != "lm_head"):
        out.append((f"{prefix}{part.name}.bias", bias, "cat" if len(bias) > 1 else "copy"))
    return out


# ----------------------------------------------------------------------------------------------
# reading an HF folder


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder: model.safetensors, its shards (with the index), or
    pytorch_model.bin loaded with weights_only=True (never arbitrary pickled code)."""
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    bin_file, bin_index = folder / "pytorch_model.bin", folder / "pytorch_model.bin.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file() or bin_index.is_file():
        weight_map = read_json(index if index.is_file() else bin_index, "weight index").get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing or not files:
            raise UserError(f"{folder}: the weight index names {missing[0] if missing else 'no files'}, which is "
                            f"not there; copy every shard into the folder")
    elif bin_file.is_file():
        files = [bin_file]
    else:
        raise UserError(f"{folder} has no weights: expected model.safetensors, model-*.safetensors with "
                        f"model.safetensors.index.json, or pytorch_model.bin")
    tensors = {}
    for f in files:
        check_regular(f, "weights file")  # never a FIFO or a link: safetensors and torch.load read by path
        tensors.update(load_file(str(f)) if f.suffix == ".safetensors" else _load_bin(f))
    return tensors


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code
        raise UserError(f"{path} was refused by torch.load(weights_only=True) ({str(e).splitlines()[0][:120]}); "
                        f"convert it to safetensors with a tool you trust") from None


def hf_to_minigpt(raw: dict, c: ModelConfig, tensors: dict[str, torch.Tensor], origin: str) -> dict:
    """The minigpt state dict of an HF model's tensors; `c` is model_from_hf(raw, for_weights=True)."""
    family = "gpt2" if raw["model_type"] == "gpt2" else "llama"
    if family == "gpt2" and not any(k.startswith("transformer.") for k in tensors):
        tensors = {f"transformer.{k}": v for k, v in tensors.items()}  # saved from GPT2Model
    used, state = set(), {}
    for ours, parts, how in layout(c, family):
        got = []
        for name, shape in parts:
            if name not in tensors:
                raise UserError(f"{origin}: tensor {name} is missing from the weights ({len(tensors)} tensors there)")
            if tuple(tensors[name].shape) != shape:
                raise UserError(f"{origin}: tensor {name} has shape {tuple(tensors[name].shape)}, the config implies "
                                f"{shape}; the weights and config.json disagree")
            got.append(tensors[name])
            used.add(name)
        state[ours] = torch.cat(got, 0) if how == "cat" else got[0].t() if how == "T" else got[0]
    extra = sorted(k for k in tensors if k not in used and not _ignorable(k, c))
    if extra:
        raise UserError(f"{origin}: tensor {extra[0]} (and {len(extra) - 1} more) has no place in a "
                        f"{raw['model_type']} model of this config; the architecture differs")
    return {k: v.contiguous() for k, v in state.items()}


def _ignorable(name: str, c: ModelConfig) -> bool:
    if name.endswith(IGNORED_SUFFIXES) or (name.endswith(".attn.bias") and name.startswith("transformer.h.")):
        return True
    return name == "lm_head.weight" and c.tie_embeddings  # a tied head some checkpoints also store


def minigpt_to_hf(c: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF state dict of a minigpt model (padding rows of the vocabulary dropped). Biases that
    GPT-2 has and the model does not (model.bias = false) are written as zeros: the same function."""
    family = hf_family(c)
    out = {}
    for ours, parts, how in layout(c, "gpt2" if family == "gpt2" else "llama"):
        w = weights.get(ours)
        if w is None:
            w = torch.zeros(parts[0][1])  # a GPT-2 bias the model does not have
        if ours in VOCAB_ROWS:
            w = w[: c.vocab_size]
        if how == "T":
            w = w.t()
        pieces = w.split([shape[0] for _, shape in parts], 0) if how == "cat" else [w]
        out.update({name: piece.contiguous() for (name, _), piece in zip(parts, pieces)})
    return out


# ----------------------------------------------------------------------------------------------
# the two commands


def _output_folder(out: Path) -> Path:
    """A fresh temporary sibling of `out`, renamed onto it by _publish."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; give another --out or delete it")
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    if out.is_dir():
        out.rmdir()  # empty, checked by _output_folder
    tmp.rename(out)


def _hf_tokenizer(src: Path, vocab_size: int):
    path = src / "tokenizer.json"
    tok = read_tokenizer(path, f"{src} has no tokenizer.json (a fast tokenizer's file): minigpt needs it to encode "
                               f"prompts and data; add it to the folder")
    if tok.get_vocab_size() > vocab_size:
        raise UserError(f"{path} has {tok.get_vocab_size():,} tokens but config.json's vocab_size is {vocab_size:,}: "
                        f"the tokenizer belongs to another model")
    return tok


def import_hf(src: str | Path, out: str | Path) -> dict:
    """An HF folder -> a minigpt run directory (config.json, tokenizer.json, a step-0 checkpoint)."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json: give a Hugging Face model folder (config.json + weights)")
    raw = read_json(src / "config.json", "config")
    if not is_hf_config(raw):
        raise UserError(f"{src / 'config.json'} has no model_type: it is not a Hugging Face model config")
    c = model_from_hf(raw, str(src / "config.json"), for_weights=True)  # refused before any weight is read
    check_fits(2 * model_bytes(c), "cpu", f"converting {src} ({param_counts(c).total:,} parameters, read and mapped)",
               "convert on a machine with more memory")
    _hf_tokenizer(src, c.vocab_size)
    state = hf_to_minigpt(raw, c, read_hf_tensors(src), str(src))
    _check_fits(c, state)
    stop, eos = hf_stop_token(src)
    cfg = Config(model=c, data=DataConfig(tokenizer=str((out / "tokenizer.json").resolve())),
                 train=TrainConfig(out_dir=str(out)), sample=SampleConfig(stop_token=stop))
    tmp = _output_folder(out)
    try:
        atomic_write_text(tmp / "config.json", cfg.to_json())
        tok_bytes = read_regular(src / "tokenizer.json", "tokenizer", MAX_TOKENIZER_BYTES)
        atomic_write(tmp / "tokenizer.json", lambda p: p.write_bytes(tok_bytes))
        # the tokenizer pinned, as training pins its own: every reader checks it (run/load.check_tokenizer)
        atomic_write_text(tmp / "data.json", json.dumps({"tokenizer_sha256": digest(tok_bytes)["sha256"],
                                                         "source": f"converted from {src.resolve()}"}, indent=2))
        info = {"from": str(src.resolve()), "model_type": raw["model_type"], "architectures": raw.get("architectures"),
                "eos_token_id": eos, "params": sum(t.numel() for t in state.values())}
        atomic_write_text(tmp / "imported.json", json.dumps(info, indent=2))
        folder = new_checkpoint_folder(tmp, 0)
        save_weights(state, folder / WEIGHTS)
        commit_checkpoint(tmp, 0, folder)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _check_fits(c: ModelConfig, state: dict) -> None:
    """The converted tensors are exactly the model's (names and shapes): a converter bug otherwise."""
    from minigpt.nn.model import GPT

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(c).state_dict().items()}
    if c.tie_embeddings:
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert got == expected, f"converter bug: {set(got) ^ set(expected) or [k for k in got if got[k] != expected[k]]}"


def export_hf(run_dir: str | Path, out: str | Path) -> dict:
    """A minigpt run's latest checkpoint -> an HF folder that transformers' Auto classes load."""

    run_dir, out = Path(run_dir), Path(out)
    folder, step = latest_checkpoint(run_dir)
    cfg = config_from_json(run_dir / "config.json")
    c = cfg.model
    if c.quantization:
        raise UserError(f"{run_dir} holds {c.quantization}-quantized weights (quantized.json names its source run): "
                        f"export the source run instead")
    hf_family(c)  # refuse before writing anything
    check_tokenizer(run_dir)
    check_fits(2 * model_bytes(c), "cpu", f"exporting {run_dir} ({param_counts(c).total:,} parameters, read and mapped)",
               "export on a machine with more memory, or check that its config.json is the run's own")
    if not (run_dir / "tokenizer.json").is_file():
        raise UserError(f"{run_dir} has no tokenizer.json: the run directory is damaged")
    tok = _hf_tokenizer(run_dir, c.vocab_size)
    eos = tok.token_to_id(cfg.sample.stop_token)
    hf_config = hf_from_model(c, eos, eos)
    state = minigpt_to_hf(c, _run_weights(folder, cfg) if cfg.train.lora_rank else read_weights(folder))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.block_size,
                  **({"eos_token": cfg.sample.stop_token, "bos_token": cfg.sample.stop_token} if eos is not None else {})}
    tmp = _output_folder(out)
    try:
        atomic_write_text(tmp / "config.json", json.dumps(hf_config, indent=2))
        atomic_write_text(tmp / "generation_config.json", json.dumps({"bos_token_id": eos, "eos_token_id": eos}, indent=2))
        atomic_write_text(tmp / "tokenizer_config.json", json.dumps(tok_config, indent=2))
        shutil.copyfile(run_dir / "tokenizer.json", tmp / "tokenizer.json")
        save_weights(state, tmp / "model.safetensors")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"run": str(run_dir), "step": step, "model_type": hf_config["model_type"],
            "architectures": hf_config["architectures"], "out": str(out)}


def _run_weights(folder: Path, cfg) -> dict[str, torch.Tensor]:
    """A LoRA run's weights: its base with the adapters merged (the checkpoint holds the adapters alone)."""
    from minigpt.nn.model import GPT

    model = GPT(cfg.model)
    load_run_weights(model, folder, cfg)
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_init_weights(model, source: str) -> str:
    """Copy train.init_from's weights (a minigpt run's latest checkpoint, or an HF folder) into
    `model`; returns what was loaded, for the run's first lines."""
    src = Path(source)
    raw = read_json(src / "config.json", "config")
    if not is_hf_config(raw):
        saved = config_from_json(src / "config.json")
        _, step = load_latest(src, lambda folder: load_run_weights(model, folder, saved))
        return f"weights of run {src} (step {step})" + (" with its LoRA adapters merged" if saved.train.lora_rank else "")
    state = hf_to_minigpt(raw, model_from_hf(raw, str(src), for_weights=True), read_hf_tensors(src), str(src))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied head
    return f"weights of Hugging Face {raw.get('architectures', [raw['model_type']])[0]} in {src}"
