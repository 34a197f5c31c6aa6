"""This project's model against the authors' own outputs (../shared/fixtures/adrec_reference/).

The fixture holds what the authors' ADRec code computes on a tiny configuration (D = 32, 50 items,
B = 4, L = 8, T = 32), with every random draw stored: the weights under their parameter names,
training batches with and without padding, x_t, x̂_0, CE, MSE, every parameter's gradient, the
32-step sampler, their SASRec (stage 1), their noise schedules and five warm-up steps with a
"frozen" embedding. The weights are loaded into this project's model by `load_authors_weights`
and every output must agree within float32 rounding. The default `padding_mask='key'` reproduces
the fixture's key-masked variant of the padded batch; `padding_mask='query'` reproduces the
authors' own query-masked one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adrec.config import TrialConfig
from adrec.model import ADRec, SASRec
from adrec.schedule import NoiseSchedule, make_betas
from adrec.train import backward, make_optimizer, optimizer_step

torch.set_num_threads(1)

FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "adrec_reference"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"the authors' reference outputs are not at {FIXTURE}")

N_ITEMS, T = 50, 32
# Float32 tolerances: single forward values agree to ~1e-6; gradients and the 32-step sampler
# accumulate more rounding (relative to the tensor's largest entry).
FORWARD_TOL = 1e-5  # observed here: 1.3e-6
GRAD_TOL = 2e-5  # observed here: 3.0e-6
SAMPLER_TOL = 5e-5  # observed here: 6.2e-6 (scores)


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURE / "adrec_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def sasrec_ref() -> dict:
    return torch.load(FIXTURE / "sasrec_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def warmup_ref() -> dict:
    return torch.load(FIXTURE / "warmup_frozen_emb.pt", weights_only=True)


def tiny_config(ref: dict, **changes) -> TrialConfig:
    """This project's config for the fixture's arguments (`config/...`)."""
    c = {k.split("/", 1)[1]: v for k, v in ref.items() if k.startswith("config/") and "/seeds/" not in k}
    values = dict(hidden_size=int(c["hidden_size"]), max_len=int(c["max_len"]), dropout=float(c["dropout"]),
                  emb_dropout=float(c["emb_dropout"]), diffusion_steps=int(c["diffusion_steps"]),
                  noise_schedule=str(c["noise_schedule"]), beta_a=float(c["beta_a"]), beta_b=float(c["beta_b"]),
                  lambda_uncertainty=float(c["lambda_uncertainty"]), mse_weight=float(c["loss_scale"]),
                  pcgrad=bool(c["pcgrad"]), lr=float(c["lr"]), weight_decay=float(c["weight_decay"]),
                  heads=int(c.get("num_heads", 4)), cam_blocks=int(c.get("encoder_blocks", 2)), adm_blocks=2,
                  model="sasrec" if c["model"] == "pretrain" else "adrec", device="cpu")
    return TrialConfig(**{**values, **changes})


# ---------------------------------------------------------------------------------------------
# The authors' parameter names -> this project's
# ---------------------------------------------------------------------------------------------
def _block_names(theirs: str, ours: str) -> dict[str, list[str]]:
    """One Transformer block: our name -> the authors' names whose tensors it concatenates."""
    pairs = {"attn.q": ["attention.linear_layers.0"], "attn.kv": ["attention.linear_layers.1", "attention.linear_layers.2"],
             "attn.out": ["attention.w_layer"], "ffn.0": ["feed_forward.w_1"], "ffn.3": ["feed_forward.w_2"],
             "norms.0": ["input_sublayer.norm"], "norms.1": ["output_sublayer.norm"]}
    return {f"{ours}.{o}.{p}": [f"{theirs}.{t}.{p}" for t in ts] for o, ts in pairs.items() for p in ("weight", "bias")}


def name_map(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every parameter of this project's ADRec or SASRec -> the authors' names of the same tensor
    (keys and values are one (2d, d) layer here, two (d, d) layers there: rows K then V)."""
    out: dict[str, list[str]] = {"item_emb.weight": ["item_embedding.weight"]}
    if isinstance(model, ADRec):
        out.update({"hist_norm.weight": ["hist_norm.weight"], "hist_norm.bias": ["hist_norm.bias"]})
        for i in range(2):
            out.update(_block_names(f"diffu.ag_encoder.transformer_blocks.{i}", f"cam.blocks.{i}"))
            out.update(_block_names(f"diffu.net.decoder.transformer_blocks.{i}", f"adm.net.blocks.{i}"))
        for ours, theirs in (("adm.time_mlp.0", "diffu.net.time_embed.0"), ("adm.time_mlp.2", "diffu.net.time_embed.2")):
            out.update({f"{ours}.{p}": [f"{theirs}.{p}"] for p in ("weight", "bias")})
    else:
        out.update({"norm.weight": ["LayerNorm.weight"], "norm.bias": ["LayerNorm.bias"]})
        for i in range(2):
            out.update(_block_names(f"trm_encoder.transformer_blocks.{i}", f"encoder.blocks.{i}"))
    return out


def theirs_as_ours(model: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The fixture's per-parameter tensors under `prefix` (weights, gradients) in this model's names."""
    return {ours: torch.cat([tensors[prefix + t] for t in theirs]) for ours, theirs in name_map(model).items()}


def load_authors_weights(model: torch.nn.Module, ref: dict, prefix: str = "state_dict/") -> None:
    mapped = theirs_as_ours(model, ref, prefix)
    own = dict(model.named_parameters())
    assert set(mapped) == set(own), set(mapped) ^ set(own)  # every parameter, nothing else
    with torch.no_grad():
        for name, value in mapped.items():
            own[name].copy_(value)


def adrec(ref: dict, **changes) -> ADRec:
    model = ADRec(tiny_config(ref, **changes), N_ITEMS)
    load_authors_weights(model, ref)
    return model


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = FORWARD_TOL) -> None:
    """Equal within `tol` relative to the expected tensor's largest entry (at least 1)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * scale)


# ---------------------------------------------------------------------------------------------
# Training forward, losses and gradients
# ---------------------------------------------------------------------------------------------
BATCHES = [("unpadded", "key"), ("unpadded", "query"), ("padded_keymask", "key"), ("padded_querymask", "query")]


@pytest.mark.parametrize("batch, mode", BATCHES, ids=[f"{b}-{m}" for b, m in BATCHES])
def test_training_forward_and_losses(ref: dict, batch: str, mode: str) -> None:
    model = adrec(ref, padding_mask=mode).train()
    seq, tgt = ref[f"{batch}/seq"], ref[f"{batch}/tgt"]
    out = model.forward_train(seq, tgt, t=ref[f"{batch}/t_sampled"], noise=ref[f"{batch}/noise"])
    # Key masking: padded positions compute something else than the authors' uniform attention
    # there, but no valid position sees them. Query masking reproduces every position.
    where = (seq > 0) if mode == "key" else torch.ones_like(seq, dtype=torch.bool)
    assert torch.equal(out.t, ref[f"{batch}/t"])
    close(out.x_t, ref[f"{batch}/x_t"])
    close(out.c[where], ref[f"{batch}/enc_out"][where])
    close(out.x0_hat[where], ref[f"{batch}/x0_pred"][where])
    close(out.ce, ref[f"{batch}/ce_loss"])
    close(out.mse, ref[f"{batch}/mse_loss"])


def test_the_key_masked_padded_batch_differs_from_the_authors_query_masking(ref: dict) -> None:
    """The two masks really differ on this batch (else the tests above would not tell them apart)."""
    assert abs(float(ref["padded_keymask/ce_loss"]) - float(ref["padded_querymask/ce_loss"])) > 1.0
    model = adrec(ref, padding_mask="key").train()
    seq = ref["padded_querymask/seq"]
    out = model.forward_train(seq, ref["padded_querymask/tgt"], t=ref["padded_querymask/t_sampled"],
                              noise=ref["padded_querymask/noise"])
    assert abs(out.ce.item() - float(ref["padded_querymask/ce_loss"])) > 1.0


def _grads(model: ADRec) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_match(model: ADRec, ref: dict, prefix: str) -> None:
    expected = theirs_as_ours(model, ref, prefix)
    for name, grad in _grads(model).items():
        want = expected[name]
        # Key-projection biases have a zero gradient in exact arithmetic: compare absolutely.
        scale = max(float(want.abs().max()), 1e-3)
        torch.testing.assert_close(grad, want, rtol=0, atol=GRAD_TOL * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("batch, mode", BATCHES, ids=[f"{b}-{m}" for b, m in BATCHES])
def test_gradients_of_every_parameter(ref: dict, batch: str, mode: str) -> None:
    """d(CE + MSE)/dθ for every parameter, the authors' names mapped onto this model's."""
    model = adrec(ref, padding_mask=mode, loss_combination="sum").train()
    out = model.forward_train(ref[f"{batch}/seq"], ref[f"{batch}/tgt"], t=ref[f"{batch}/t_sampled"],
                              noise=ref[f"{batch}/noise"])
    backward(model.cfg, model, out.ce, out.mse)
    assert_grads_match(model, ref, f"{batch}/grad_sum/")


@pytest.mark.parametrize("pcgrad", [False, True], ids=["plain", "pcgrad"])
def test_the_authors_mean_gradient_combination(ref: dict, pcgrad: bool) -> None:
    """`loss_combination='mean'` is the gradient the authors' PCGrad wrapper hands to Adam,
    (g_CE + g_MSE) / 2 (on this batch the two gradients do not conflict, so projecting changes
    nothing, checked here too)."""
    model = adrec(ref, pcgrad=pcgrad).train()
    assert model.cfg.loss_combination == "mean"  # the default
    out = model.forward_train(ref["unpadded/seq"], ref["unpadded/tgt"], t=ref["unpadded/t_sampled"],
                              noise=ref["unpadded/noise"])
    backward(model.cfg, model, out.ce, out.mse)
    assert_grads_match(model, ref, "unpadded/grad_pcgrad_mean/")


# ---------------------------------------------------------------------------------------------
# The 32-step sampler
# ---------------------------------------------------------------------------------------------
def _sampler_noise(ref: dict) -> torch.Tensor:
    """(T+1, B, D) as score_all takes it: x_T, then the draw of the step at t in noise[t + 1]
    (the authors' step k has t = 31 - k; only the last position of each draw is used)."""
    steps = ref["infer/step_noise"][:, :, -1]  # (32, B, D), step k
    return torch.cat([ref["infer/init_noise"][None, :, -1], steps.flip(0)])


@pytest.mark.parametrize("naive", [False, True], ids=["cached", "naive"])
@pytest.mark.parametrize("mode", ["key", "query"])
def test_sampler_every_step_and_the_scores(ref: dict, naive: bool, mode: str) -> None:
    model = adrec(ref, padding_mask=mode).eval()
    assert list(ref["infer/t_per_step"]) == list(range(T - 1, -1, -1))
    trace: list[tuple[torch.Tensor, torch.Tensor]] = []
    scores = model.score_all(ref["infer/seq"], noise=_sampler_noise(ref), naive=naive, trace=trace)
    assert len(trace) == T
    for k, (x0_hat, x_prev) in enumerate(trace):
        close(x0_hat, ref["infer/x0_pred_last"][k], SAMPLER_TOL)
        close(x_prev, ref["infer/xprev_last"][k], SAMPLER_TOL)
    close(scores, ref["infer/scores"], SAMPLER_TOL)  # all 51 columns: the padding item is scored, as theirs
    assert model.cfg.score_padding_item


def test_score_padding_item_off_only_hides_column_0(ref: dict) -> None:
    model = adrec(ref, score_padding_item=False).eval()
    scores = model.score_all(ref["infer/seq"], noise=_sampler_noise(ref))
    assert torch.all(scores[:, 0] == -torch.inf)
    close(scores[:, 1:], ref["infer/scores"][:, 1:], SAMPLER_TOL)


# ---------------------------------------------------------------------------------------------
# Stage 1: the authors' SASRec ('pretrain')
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch, mode", [("unpadded", "key"), ("unpadded", "query"), ("padded", "query"),
                                         ("padded", "key")])
def test_stage1_sasrec(sasrec_ref: dict, batch: str, mode: str) -> None:
    model = SASRec(tiny_config(sasrec_ref, padding_mask=mode), N_ITEMS)
    load_authors_weights(model, sasrec_ref)
    model.eval()
    seq, tgt = sasrec_ref[f"{batch}/seq"], sasrec_ref[f"{batch}/tgt"]
    hidden = model.encode(seq)
    # Their padded batch is query-masked; with key masking only rows without padding agree.
    rows = (seq > 0).all(1) if mode == "key" else torch.ones(seq.shape[0], dtype=torch.bool)
    if batch == "padded" and mode == "key":
        assert 0 < int(rows.sum()) < seq.shape[0]
    close(hidden[rows], sasrec_ref[f"{batch}/hidden"][rows])
    close(model.score_all(seq)[rows], sasrec_ref[f"{batch}/scores_last"][rows])
    if rows.all():
        close(model.loss(seq, tgt)[0], sasrec_ref[f"{batch}/ce_loss"])


# ---------------------------------------------------------------------------------------------
# Noise schedules
# ---------------------------------------------------------------------------------------------
def _schedule_cases() -> list[tuple[str, str, int, float, float]]:
    keys = sorted(np.load(FIXTURE / "schedules.npz").files) if FIXTURE.is_dir() else []
    out = []
    for key in keys:
        head, steps = key.rsplit("_T", 1)
        if head.startswith("beta_a"):
            a, b = head[len("beta_a"):].split("_b")
            out.append((key, "beta", int(steps), float(a), float(b)))
        else:
            out.append((key, head, int(steps), 0.3, 10.0))
    return out


def test_every_schedule_of_the_fixture_is_checked() -> None:
    assert len(_schedule_cases()) == 36


@pytest.mark.parametrize("key, name, steps, a, b", _schedule_cases(), ids=[c[0] for c in _schedule_cases()])
def test_schedules_are_the_authors(key: str, name: str, steps: int, a: float, b: float) -> None:
    expected = np.asarray(np.load(FIXTURE / "schedules.npz")[key], dtype=np.float64)
    betas = make_betas(name, steps, a, b)
    np.testing.assert_allclose(betas, expected, rtol=1e-13, atol=1e-15)
    NoiseSchedule.build(name, steps, a, b)  # valid here too (the clipped 0.999 and beta's 1.0 included)


def test_schedule_coefficients_are_the_authors(ref: dict) -> None:
    """The float32 coefficients the model indexes, from the authors' float64 arrays (trunc_lin, T=32)."""
    tensors = NoiseSchedule.build("trunc_lin", T).tensors()
    pairs = {"sqrt_ab": "sqrt_alphas_cumprod", "sqrt_one_minus_ab": "sqrt_one_minus_alphas_cumprod",
             "coef_x0": "posterior_mean_coef1", "coef_xt": "posterior_mean_coef2"}
    for ours, theirs in pairs.items():
        torch.testing.assert_close(getattr(tensors, ours), ref[f"schedule/{theirs}"].float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(tensors.sigma, torch.exp(0.5 * ref["schedule/model_log_variance"]).float(),
                               rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# Warm-up: the "frozen" embedding under the authors' Adam
# ---------------------------------------------------------------------------------------------
def _warmup_steps(ref: dict, warmup_ref: dict, mode: str) -> tuple[ADRec, list[torch.Tensor], list[tuple[float, float]]]:
    model = adrec(ref, warmup_embedding=mode, lr=float(warmup_ref["config/lr"]),
                  weight_decay=float(warmup_ref["config/weight_decay"])).train()
    with torch.no_grad():
        model.item_emb.weight.copy_(warmup_ref["emb_init"])
    model.item_emb.weight.requires_grad_(False)  # what the trainer does during stage 2
    optimizer, _ = make_optimizer(model.cfg, model)
    embeddings, losses = [], []
    for k in range(int(warmup_ref["config/steps"])):
        optimizer.zero_grad(set_to_none=True)
        out = model.forward_train(warmup_ref["seq"], warmup_ref["tgt"], t=warmup_ref["t"][k], noise=warmup_ref["noise"][k])
        backward(model.cfg, model, out.ce, out.mse)
        optimizer_step(model.cfg, optimizer)
        embeddings.append(model.item_emb.weight.detach().clone())
        losses.append((out.ce.item(), out.mse.item()))
    return model, embeddings, losses


def test_warmup_decayed_embedding_follows_the_authors(ref: dict, warmup_ref: dict) -> None:
    """Default `warmup_embedding='decayed'`: the zero gradient plus Adam's weight decay moves the
    'frozen' embedding exactly as in the authors' five steps."""
    model, embeddings, losses = _warmup_steps(ref, warmup_ref, "decayed")
    assert model.cfg == model.cfg.replace(warmup_embedding="decayed") and TrialConfig().warmup_embedding == "decayed"
    for k, emb in enumerate(embeddings):
        torch.testing.assert_close(emb, warmup_ref["emb_after_step"][k], rtol=0, atol=2e-6)
        assert losses[k][0] == pytest.approx(float(warmup_ref["ce_loss"][k]), abs=2e-5)
        assert losses[k][1] == pytest.approx(float(warmup_ref["mse_loss"][k]), abs=2e-5)
    drift = (embeddings[-1] - warmup_ref["emb_init"]).abs().max()
    assert drift > 1e-3  # it really moved (the authors' largest drift after 5 steps is 0.005)


def test_warmup_frozen_embedding_stays_bitwise(ref: dict, warmup_ref: dict) -> None:
    _, embeddings, losses = _warmup_steps(ref, warmup_ref, "frozen")
    assert all(torch.equal(emb, warmup_ref["emb_init"]) for emb in embeddings)
    assert losses[0][0] == pytest.approx(float(warmup_ref["ce_loss"][0]), abs=2e-5)  # step 0 is the same
