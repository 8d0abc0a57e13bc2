"""megatron-core models against transformers, in one process at TP=PP=1, fp32.

Logit parity for every supported architecture variant (and the real embedded teacher), the lossless
HF -> checkpoint -> HF round trip, parameter counts, padded-vocabulary masking and user errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from nemo_minitron import embedded
from nemo_minitron.checkpoint import io
from nemo_minitron.checkpoint.hf import read_hf_config
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelConfig
from nemo_minitron.parallel.sharding import check_divisible

TOL = 1e-4
TEACHER_PARAMS = 134_515_008


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_ids(vocab_size: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    return model(ids, positions, None)


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file(s) of a directory (sharded or not)."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "name, seq",
    [
        ("untied", 48),
        ("tied", 48),
        # Longer than original_max_position_embeddings (64) of the llama3 scaling.
        ("rope", 160),
        ("mistral", 48),
        ("padded", 48),
    ],
)
def test_logit_parity_with_transformers(tiny_hf_dirs, single_rank, name, seq):
    path = tiny_hf_dirs[name]
    loaded = io.load_model(str(path))
    cfg = loaded.cfg
    ref_model = hf_model(path)
    ids = random_ids(cfg.vocab_size, 2, seq)

    ours = megatron_logits(loaded.model, ids)
    ref = hf_logits(ref_model, ids)

    assert ours.shape == (2, seq, cfg.padded_vocab_size(1))
    diff = (ours[..., : cfg.vocab_size] - ref).abs().max().item()
    assert diff <= TOL, f"{name}: max |megatron - transformers| = {diff:.3g}"
    # Weights are large (std 0.2): mistakes in any layer would show far above the tolerance.
    assert ref.abs().max() > 1.0


def test_mistral_sliding_window_is_honoured(tiny_hf_dirs, single_rank, tmp_path):
    """A sliding window shorter than the sequence masks exactly what transformers masks."""
    import shutil

    path = Path(shutil.copytree(tiny_hf_dirs["mistral"], tmp_path / "mistral"))
    hf = json.loads((path / "config.json").read_text())
    hf["sliding_window"] = 8
    (path / "config.json").write_text(json.dumps(hf))
    loaded = io.load_model(str(path))
    ids = random_ids(loaded.cfg.vocab_size, 2, 32)
    ours, ref = megatron_logits(loaded.model, ids), hf_logits(hf_model(path), ids)
    assert (ours[:, :8, : loaded.cfg.vocab_size] - ref[:, :8]).abs().max() <= TOL
    assert (ours[..., : loaded.cfg.vocab_size] - ref).abs().max() <= TOL


def test_tiny_configs_are_what_the_parity_tests_claim(tiny_hf_dirs):
    untied, tied = read_hf_config(tiny_hf_dirs["untied"]), read_hf_config(tiny_hf_dirs["tied"])
    rope, mistral = read_hf_config(tiny_hf_dirs["rope"]), read_hf_config(tiny_hf_dirs["mistral"])
    assert untied.num_query_groups < untied.num_attention_heads and not untied.tie_word_embeddings
    assert tied.tie_word_embeddings and tied.padded_vocab_size(1) == tied.vocab_size
    padded = read_hf_config(tiny_hf_dirs["padded"])
    assert padded.tie_word_embeddings and (padded.vocab_size, padded.padded_vocab_size(1)) == (250, 256)
    assert rope.rope_scaling is not None and rope.rope_scaling.original_max_position_embeddings == 64
    # The scaling changes the low frequencies (else the rope case would test nothing new).
    unscaled = rope.model_copy(update={"rope_scaling": None}).rope_inv_freq()
    assert not torch.allclose(rope.rope_inv_freq(), unscaled)
    assert mistral.model_type == "mistral"


def teacher_text_ids(batch: int, seq: int) -> torch.Tensor:
    """``batch`` x ``seq`` tokens of the embedded Shakespeare corpus, in the teacher's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded.teacher_dir())
    text = sorted(embedded.corpus_dir().glob("*/*.md"))[0].read_text(encoding="utf-8")[:4000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: batch * seq]
    assert len(ids) == batch * seq
    return torch.tensor(ids).view(batch, seq)


def test_teacher_logit_parity(single_rank):
    loaded = io.load_model(embedded.TEACHER)
    cfg = loaded.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    ids = teacher_text_ids(2, 64)

    ours = megatron_logits(loaded.model, ids)[..., : cfg.vocab_size]
    ref = hf_logits(hf_model(embedded.teacher_dir()), ids)
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"teacher: max |megatron - transformers| = {diff:.3g}"

    # 30 fp32 layers with logits up to ~40: 1e-4 is close to fp32 rounding noise. Against an fp64 run of
    # transformers, megatron must be about as accurate as transformers' own fp32 run.
    from transformers import AutoModelForCausalLM

    exact = AutoModelForCausalLM.from_pretrained(embedded.teacher_dir(), dtype=torch.float64).eval()
    truth = hf_logits(exact, ids)
    ours_err, ref_err = (ours - truth).abs().max().item(), (ref - truth).abs().max().item()
    assert ours_err <= 2 * max(ref_err, 1e-5), f"megatron fp32 error {ours_err:.3g}, transformers fp32 {ref_err:.3g}"


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", ["untied", "tied", "padded"])
def test_import_save_load_export_round_trip(tiny_hf_dirs, single_rank, tmp_path, name):
    src = tiny_hf_dirs[name]
    imported = io.load_model(str(src))
    io.save_checkpoint(imported, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / io.NATIVE_CONFIG).is_file()

    reloaded = io.load_model(str(tmp_path / "ckpt"))
    assert reloaded.cfg == imported.cfg
    io.export_hf(reloaded, tmp_path / "hf")

    # The exported files hold exactly the original tensors (a tied model has no lm_head in either).
    original, exported = file_tensors(src), file_tensors(tmp_path / "hf")
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        assert torch.equal(exported[key], value), key

    # ... and transformers loads them into the same model.
    ref_model, out_model = hf_model(src), hf_model(tmp_path / "hf")
    assert type(out_model) is type(ref_model)
    assert out_model.config.tie_word_embeddings == ref_model.config.tie_word_embeddings
    ref_sd, out_sd = ref_model.state_dict(), out_model.state_dict()
    assert sorted(out_sd) == sorted(ref_sd)
    for key in ref_sd:
        assert torch.equal(out_sd[key], ref_sd[key]), key

    ids = random_ids(imported.cfg.vocab_size, 2, 24, seed=3)
    assert torch.equal(hf_logits(out_model, ids), hf_logits(ref_model, ids))
    assert torch.equal(megatron_logits(reloaded.model, ids), megatron_logits(imported.model, ids))


def test_export_writes_loadable_config_and_tokenizer_files(tiny_hf_dirs, single_rank, tmp_path):
    loaded = io.load_model(str(tiny_hf_dirs["rope"]))
    io.export_hf(loaded, tmp_path / "hf")
    # The exported config describes the same architecture, rope scaling included.
    assert read_hf_config(tmp_path / "hf") == loaded.cfg
    ids = random_ids(loaded.cfg.vocab_size, 1, 96, seed=5)
    assert torch.equal(hf_logits(hf_model(tmp_path / "hf"), ids), hf_logits(hf_model(tiny_hf_dirs["rope"]), ids))
    with pytest.raises(UserError, match="already exists"):
        io.export_hf(loaded, tmp_path / "hf")
    io.export_hf(loaded, tmp_path / "hf", overwrite=True)


# ---------------------------------------------------------------------------------------- param counts


@pytest.mark.parametrize("name", ["untied", "tied", "rope", "mistral", "padded"])
def test_num_params_matches_transformers(tiny_hf_dirs, name):
    cfg = read_hf_config(tiny_hf_dirs[name])
    model = hf_model(tiny_hf_dirs[name])
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_teacher_num_params():
    assert read_hf_config(embedded.teacher_dir()).num_params() == TEACHER_PARAMS


# ------------------------------------------------------------------------------------- padded vocabulary


def test_padded_vocab_sizes():
    cfg = read_hf_config(embedded.teacher_dir())
    assert [cfg.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [49152] * 4
    small = cfg.model_copy(update={"vocab_size": 250})
    assert [small.padded_vocab_size(tp) for tp in (1, 2, 4)] == [256, 256, 512]
    odd = small.model_copy(update={"make_vocab_size_divisible_by": 100})
    assert [odd.padded_vocab_size(tp) for tp in (1, 2)] == [300, 400]


def test_token_cross_entropy_masks_padded_vocab(tiny_hf_dirs, single_rank):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_minitron.parallel.vocab import mask_padded_vocab, token_cross_entropy

    loaded = io.load_model(str(tiny_hf_dirs["padded"]))
    vocab = loaded.cfg.vocab_size
    assert (vocab, loaded.cfg.padded_vocab_size(1)) == (250, 256)
    ids = random_ids(vocab, 2, 33, seed=11)
    logits = megatron_logits(loaded.model, ids[:, :-1])
    assert logits.shape[-1] == 256
    labels = ids[:, 1:]

    ours = token_cross_entropy(logits.clone(), labels, vocab)
    ref = F.cross_entropy(logits[..., :vocab].reshape(-1, vocab), labels.reshape(-1), reduction="none")
    assert ours.shape == labels.shape
    torch.testing.assert_close(ours.reshape(-1), ref, rtol=1e-6, atol=1e-5)

    # The padded rows hold zero weights, hence zero logits: left unmasked they would take probability mass.
    assert torch.equal(logits[..., vocab:], torch.zeros_like(logits[..., vocab:]))
    unmasked = vocab_parallel_cross_entropy(logits.clone(), labels)
    assert (unmasked.reshape(-1) - ref).abs().max() > 1e-3

    masked = mask_padded_vocab(logits, vocab)
    assert torch.equal(masked[..., :vocab], logits[..., :vocab])
    assert (masked[..., vocab:] == torch.finfo(logits.dtype).min).all()


def test_token_cross_entropy_masks_synthetic_padding(single_rank):
    from nemo_minitron.parallel.vocab import token_cross_entropy

    vocab, padded = 250, 256
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, padded, generator=g) * 4
    logits[..., vocab:] = 50.0  # padding that would dominate the softmax
    labels = torch.randint(0, vocab, (3, 5), generator=g)
    ours = token_cross_entropy(logits.clone(), labels, vocab)
    ref = F.cross_entropy(logits[..., :vocab].reshape(-1, vocab), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(ours.reshape(-1), ref, rtol=1e-6, atol=1e-5)
    # bf16 logits are scored in fp32 and still masked.
    ours_bf16 = token_cross_entropy(logits.bfloat16(), labels, vocab)
    assert ours_bf16.dtype == torch.float32
    ref_bf16 = F.cross_entropy(
        logits.bfloat16().float()[..., :vocab].reshape(-1, vocab), labels.reshape(-1), reduction="none"
    )
    torch.testing.assert_close(ours_bf16.reshape(-1), ref_bf16, rtol=1e-6, atol=1e-5)


def test_token_cross_entropy_leaves_logits_untouched(single_rank):
    from nemo_minitron.parallel.vocab import token_cross_entropy

    logits = torch.randn(2, 4, 256, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    token_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long), 256)
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------------------------- build options


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_parallel_rmsnorm_is_torch_rmsnorm_with_megatrons_mark(dtype):
    """The local spec's norm under sequence parallelism: torch.nn.RMSNorm's state dict and values, bit for bit
    (forward and backward), and the weight marked for the sum of its gradient over TP."""
    from types import SimpleNamespace

    from nemo_minitron.models.norm import SequenceParallelRMSNorm

    g = torch.Generator().manual_seed(0)
    ref = torch.nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(64, generator=g))
    ours = SequenceParallelRMSNorm(SimpleNamespace(sequence_parallel=True), hidden_size=64, eps=1e-5)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == ["weight"] and ours.eps == ref.eps
    assert ours.weight.sequence_parallel is True
    assert SequenceParallelRMSNorm(SimpleNamespace(sequence_parallel=False), 64).weight.sequence_parallel is False

    x = torch.randn(8, 2, 64, generator=g).to(dtype)
    grad = torch.randn(8, 2, 64, generator=g).to(dtype)
    outs = []
    for norm in (ref, ours):
        inp = x.clone().requires_grad_()
        out = norm(inp)
        out.backward(grad)
        outs.append((out, inp.grad, norm.weight.grad))
    for want, got in zip(*outs):
        assert torch.equal(got, want)


def test_build_options_follow_the_layer_spec(single_rank):
    from nemo_minitron.models.builder import build_model, transformer_config

    # persist_layer_norm is a TE norm option; megatron's wrapper of the local spec's torch norms refuses it.
    assert not transformer_config(_cfg(), use_te=False).persist_layer_norm
    assert transformer_config(_cfg(), use_te=True).persist_layer_norm
    full = transformer_config(_cfg(), recompute="full")
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)
    selective = transformer_config(_cfg(), recompute="selective")
    assert (selective.recompute_granularity, selective.recompute_modules) == ("selective", ["core_attn"])
    with pytest.raises(UserError, match="^sequence parallelism needs tensor_model_parallel_size > 1$"):
        build_model(_cfg(), sequence_parallel=True, use_te=False)


@pytest.mark.parametrize("recompute", [None, "selective", "full"])
@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu_flags", "gpu_flags"])
def test_the_local_spec_builds_and_runs_with_the_flags_of_either_device(single_rank, on_gpu, recompute):
    """Pruning and NAS calibrate on the local spec on every machine: with the GPU's flags too, its layers (whose
    norm wrapper refuses TE-only options such as persist_layer_norm) must build, and run here on the CPU."""
    from nemo_minitron.models.builder import build_model

    torch.manual_seed(0)
    model = build_model(_cfg(), use_te=False, on_gpu=on_gpu, recompute=recompute)
    assert model.config.use_cpu_initialization is not on_gpu and model.config.masked_softmax_fusion is on_gpu
    ids = torch.randint(0, 256, (2, 8))
    logits = model(ids, torch.arange(8).expand(2, 8), None)
    assert logits.shape == (2, 8, 256) and torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()


@pytest.mark.parametrize("fp8", [None, "hybrid"])
def test_the_te_spec_config_builds_with_the_gpu_flags(single_rank, fp8):
    """What the TE layer spec gets on a GPU (its modules need Transformer Engine and CUDA: tests/test_gpu.py)."""
    from nemo_minitron.models.builder import transformer_config

    config = transformer_config(_cfg(), torch.bfloat16, fp8=fp8, use_te=True, on_gpu=True, recompute="selective")
    assert config.persist_layer_norm and not config.use_cpu_initialization and config.fp8 == fp8


# ---------------------------------------------------------------------------------------------- errors


def test_unsupported_model_type_is_a_user_error(tiny_hf_dirs, tmp_path):
    hf = json.loads((tiny_hf_dirs["untied"] / "config.json").read_text())
    hf["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match="gpt2"):
        read_hf_config(tmp_path)
    # load_model reads the config before it builds anything: no megatron state is needed to fail.
    with pytest.raises(UserError, match="unsupported model_type 'gpt2'"):
        io.load_model(str(tmp_path))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
    ],
)
def test_unsupported_hf_features_are_user_errors(tiny_hf_dirs, tmp_path, change, message):
    hf = json.loads((tiny_hf_dirs["untied"] / "config.json").read_text())
    hf.pop("rope_parameters", None)
    hf.update(change)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match=message):
        read_hf_config(tmp_path)


def test_missing_model_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        io.load_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="neither"):
        io.load_model(str(tmp_path))


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, ffn_hidden_size=96, num_layers=4, num_attention_heads=4,
                num_query_groups=2)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "cfg, tp, pp, message",
    [
        (_cfg(num_attention_heads=9, num_query_groups=3, hidden_size=576), 2, 1,
         "num_query_groups 3 is not divisible by tensor_model_parallel_size 2"),
        (_cfg(ffn_hidden_size=90, num_query_groups=4), 4, 1,
         "ffn_hidden_size 90 is not divisible by tensor_model_parallel_size 4"),
        (_cfg(), 1, 3, "num_layers 4 is not divisible by pipeline_model_parallel_size 3"),
    ],
)
def test_check_divisible_names_the_value(cfg, tp, pp, message):
    with pytest.raises(UserError) as info:
        check_divisible(cfg, tp, pp)
    assert str(info.value) == message


def test_check_divisible_accepts_valid_splits():
    check_divisible(_cfg(), 2, 2)
    check_divisible(_cfg(), 2, 4)
    check_divisible(read_hf_config(embedded.teacher_dir()), 3, 5)
