
import pytest
from conftest import REPO, run_cli

from minigpt.core.config import ModelConfig, config_from_json, load_config
from minigpt.core.errors import UserError


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.model.n_embd % cfg.model.n_head == 0
    assert cfg.model.padded_vocab_size % 64 == 0 and cfg.model.padded_vocab_size >= cfg.model.vocab_size


def test_gpt3_presets_match_the_paper_shapes():
    # Brown et al. 2020, Table 2.1: (layers, d_model, d_head)
    shapes = {"small": (12, 768, 64), "medium": (24, 1024, 64), "large": (24, 1536, 96), "xl": (24, 2048, 128),
              "2.7b": (32, 2560, 80), "6.7b": (32, 4096, 128), "13b": (40, 5120, 128), "175b": (96, 12288, 128)}
    for name, (L, h, q) in shapes.items():
        m = load_config(REPO / "configs" / f"gpt3-{name}.toml").model
        assert (m.n_layer, m.n_embd, m.head_dim, m.block_size, m.vocab_size, m.ffn_hidden) == (L, h, q, 2048, 50257, 4 * h)


def test_defaults_fill_derived_fields():
    m = ModelConfig(n_embd=96, n_head=6)
    assert m.n_kv_head == 6 and m.ffn_hidden == 384
    s = ModelConfig(n_embd=96, n_head=6, mlp="swiglu")
    assert s.ffn_hidden == 256  # 8/3 * 96 = 256, a multiple of 64


def test_overrides_parse_toml_values_and_bare_strings(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "model.bias=true", "data.source=/some/path", "model.n_kv_head=2"])
    assert cfg.train.lr == 3e-4 and cfg.model.bias is True
    assert cfg.data.source == "/some/path" and cfg.model.n_kv_head == 2


@pytest.mark.parametrize("override, words", [
    ("model.n_layers=2", ["unknown key model.n_layers", "n_layer"]),
    ("modle.n_layer=2", ["unknown table [modle]", "model"]),
    ("model.n_layer=2.5", ["model.n_layer", "expected int"]),
    ("model.bias=1", ["model.bias", "expected bool"]),
    ("model.n_head=5", ["not divisible by model.n_head", "pick n_head from"]),
    ("model.n_kv_head=3", ["not divisible by model.n_kv_head"]),
    ("model.mlp=relu", ["model.mlp", "'gelu'"]),
    ("train.precision=fp8", ["train.precision", "'bf16'"]),
    ("model.dropout=1.5", ["model.dropout"]),
    ("train", ["expected section.key=value"]),
])
def test_bad_config_is_a_clear_error(override, words):
    with pytest.raises(UserError) as e:
        load_config(REPO / "configs" / "tiny.toml", [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_a_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nstpes = 10\n")
    with pytest.raises(UserError, match=r"unknown key train.stpes; valid keys in \[train\]: out_dir"):
        load_config(p)  # nothing close: every key named
    p.write_text("[train]\nmax_stpes = 10\n")
    with pytest.raises(UserError, match=r"unknown key train.max_stpes; did you mean train.max_steps\?"):
        load_config(p)


def test_missing_file_lists_presets(tmp_path):
    with pytest.raises(UserError, match="presets: .*tiny"):
        load_config(tmp_path / "nope.toml")


def test_json_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "gpt2-small.toml", ["model.n_kv_head=4"])
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert config_from_json(tmp_path / "c.json") == cfg


def test_cli_error_is_one_line_without_traceback():
    r = run_cli("train", "--set", "model.n_embd=100", "--set", "model.n_head=3")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("error: model.n_embd = 100 is not divisible by model.n_head = 3")
    assert "Traceback" not in r.stderr
