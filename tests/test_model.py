"""adrec.model: one contract swept over every valid aggregation × positional encoding × denoiser.

Causality is tested on the two verbs the trainer uses (`encode`, then `adm` on fixed t and x_t) in
eval mode, and the cached last-token sampler is compared with the naive full recompute. The
equivalence tests run twice: with every parameter drawn from N(0, 0.1) (adaLN's modulation starts
at zero, which would hide a wrong cache) and at the model's real initialisation (xavier attention,
unit LayerNorm gains, N(0, 1) embeddings), where attention is far from uniform, so a wrong mask
or position shows.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from adrec.config import TrialConfig
from adrec.batches import pack
from adrec.model import ADRec, MostPopular, SASRec, build_model, segment_layout, sequence_mean

torch.set_num_threads(1)  # tiny tensors: extra threads only contend with the other test processes

N_ITEMS = 40
TINY = dict(hidden_size=16, heads=2, cam_blocks=2, adm_blocks=2, max_len=20, diffusion_steps=24, device="cpu")


def _variants() -> list[tuple[str, str, str]]:
    out = []
    for agg, pe, den in itertools.product(("linear", "cross_attention", "adaln", "concat"),
                                          ("none", "learned", "sinusoidal", "rotary"), ("transformer", "mlp")):
        try:
            TrialConfig(aggregation=agg, positional_encoding=pe, denoiser=den, **TINY)
        except ValueError:
            continue
        out.append((agg, pe, den))
    return out


VARIANTS = _variants()
VARIANT_IDS = ["-".join(v) for v in VARIANTS]


def test_every_valid_variant_is_swept() -> None:
    assert len(VARIANTS) == 24  # 4 × 4 transformer + (linear, concat) × 4 mlp


INITS = ["n01", "real"]


def make_model(variant: tuple[str, str, str], randomise: bool = True, seed: int = 0, **changes) -> ADRec:
    """An eval-mode ADRec; `randomise` draws every parameter from N(0, 0.1) so zero-initialised parts
    (adaLN modulation, padding row) cannot hide a bug; `randomise=False` keeps the real initialisation.
    Tests that look for x_t's influence pass a large lambda_uncertainty: the authors' 1e-3 makes it
    too small to see."""
    agg, pe, den = variant
    cfg = TrialConfig(aggregation=agg, positional_encoding=pe, denoiser=den, **{**TINY, **changes})
    torch.manual_seed(seed)
    model = ADRec(cfg, N_ITEMS)
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def batch(seed: int = 0, b: int = 4, l: int = 9) -> torch.Tensor:
    """(B, L) histories, left-padded to different lengths (row 0 full, the last row one item)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (b, l), generator=g)
    for row in range(b):
        n_items = max(1, l - 3 * row)
        seq[row, : l - n_items] = 0
    return seq


# --- loss and gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_loss_is_finite_and_reaches_cam_and_adm(variant) -> None:
    model = make_model(variant).train()
    full = batch(seed=1, l=10)
    seq, tgt = full[:, :-1], full[:, 1:]
    tgt = torch.where(seq > 0, tgt, torch.zeros_like(tgt))  # targets padded where inputs are, as in training
    loss, parts = model.loss(seq, tgt)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(parts) == {"ce", "mse"} and all(torch.isfinite(v) for v in parts.values())
    torch.testing.assert_close(loss, parts["ce"] + model.cfg.mse_weight * parts["mse"])
    loss.backward()
    for prefix, module in (("cam", model.cam), ("adm", model.adm), ("item_emb", model.item_emb)):
        for name, p in module.named_parameters():
            assert p.grad is not None, f"{prefix}.{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{prefix}.{name} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{prefix}.{name} has an all-zero gradient"


def test_loss_ignores_padded_targets() -> None:
    model = make_model(VARIANTS[0]).train()
    seq = batch(seed=2)
    tgt = torch.where(seq > 0, torch.randint(1, N_ITEMS + 1, seq.shape), torch.zeros_like(seq))
    n_valid = int((tgt > 0).sum())
    torch.manual_seed(5)
    _, parts = model.loss(seq, tgt)
    # CE over exactly the valid positions: recompute with the same timesteps and noise.
    torch.manual_seed(5)
    c, ctx = model.encode(seq)
    valid = tgt > 0
    x0 = model.item_emb(tgt)
    t = model.sample_timesteps(valid.long())
    x_t = torch.where(valid.unsqueeze(-1), model.schedule().add_noise(x0, t, torch.randn_like(x0)), x0)
    x0_hat, _ = model.adm(c, x_t, t, ctx)
    logits = x0_hat[valid] @ model.item_emb.weight.T
    assert logits.shape[0] == n_valid
    torch.testing.assert_close(parts["ce"], torch.nn.functional.cross_entropy(logits, tgt[valid]))


@pytest.mark.parametrize("level, expect_equal", [("token", False), ("sequence", True)], ids=["token", "sequence"])
def test_noise_level_timesteps(level: str, expect_equal: bool) -> None:
    model = make_model(VARIANTS[0], noise_level=level)
    valid = batch(seed=3, b=64, l=12) > 0
    torch.manual_seed(0)
    t = model.sample_timesteps(valid.long())
    assert t.shape == valid.shape and int(t.min()) >= 0 and int(t.max()) < model.steps
    assert torch.all(t[~valid] == 0)
    full = t[0]  # row 0 has no padding
    assert bool((full == full[0]).all()) is expect_equal
    # Packed rows: one timestep per sequence, drawn independently for each sequence of a row.
    segment = torch.tensor([[1] * 6 + [2] * 6 + [3] * 6 + [0] * 2] * 64)
    t = model.sample_timesteps(segment)
    assert torch.all(t[:, -2:] == 0)
    per_sequence = [t[:, i * 6:(i + 1) * 6] for i in range(3)]
    assert all(bool((p == p[:, :1]).all()) is expect_equal for p in per_sequence)
    if expect_equal:
        assert (per_sequence[0][:, 0] != per_sequence[1][:, 0]).any()


def test_sequence_mean_weighs_every_sequence_equally() -> None:
    values = torch.tensor([[0.0, 2.0, 4.0, 10.0, 7.0], [1.0, 1.0, 3.0, 5.0, 9.0]])
    segment = torch.tensor([[1, 1, 1, 2, 0], [0, 0, 1, 1, 1]])
    # Sequences: (0, 2, 4) -> 2, (10) -> 10, (3, 5, 9) -> 17/3; padding ignored.
    torch.testing.assert_close(sequence_mean(values, segment), torch.tensor((2 + 10 + 17 / 3) / 3))


# --- causality and padding ----------------------------------------------------------------------
def _adm_outputs(model: ADRec, seq: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    c, ctx = model.encode(seq)
    x0_hat, _ = model.adm(c, x_t, t, ctx)
    return c, x0_hat


def _fixed_inputs(seq: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, l = seq.shape
    x_t = torch.randn(b, l, TINY["hidden_size"], generator=g)
    t = torch.randint(0, TINY["diffusion_steps"], (b, l), generator=g) * (seq > 0)
    return x_t, t


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("j", [3, 6, 8], ids=lambda j: f"j{j}")
def test_changing_item_j_leaves_earlier_outputs_unchanged(variant, j: int) -> None:
    """No leak of the future: position i < j sees neither item j nor the noisy target at j."""
    model = make_model(variant, lambda_uncertainty=0.5)
    seq = batch(seed=4, l=9)  # left-padded rows: for some rows j is still padding, then becomes an item
    x_t, t = _fixed_inputs(seq)
    c, x0_hat = _adm_outputs(model, seq, x_t, t)

    changed = seq.clone()
    changed[:, j] = changed[:, j] % N_ITEMS + 1  # a different real item
    c2, x0_hat2 = _adm_outputs(model, changed, x_t, t)
    torch.testing.assert_close(c2[:, :j], c[:, :j], rtol=0, atol=1e-6)
    torch.testing.assert_close(x0_hat2[:, :j], x0_hat[:, :j], rtol=0, atol=1e-6)
    assert (c2[:, j] - c[:, j]).abs().max() > 1e-4  # the change is visible where it may be

    x_t2 = x_t.clone()
    x_t2[:, j] += torch.randn(x_t.shape[0], x_t.shape[-1], generator=torch.Generator().manual_seed(9))  # new noisy target at j
    _, x0_hat3 = _adm_outputs(model, seq, x_t2, t)
    torch.testing.assert_close(x0_hat3[:, :j], x0_hat[:, :j], rtol=0, atol=1e-6)
    assert (x0_hat3[:, j] - x0_hat[:, j]).abs().max() > 1e-4


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_padding_content_and_amount_do_not_change_valid_outputs(variant, init: str) -> None:
    """The padded positions' ids, embedding row 0, noisy targets and extra leading padding columns
    (what batch trimming changes) leave every valid position's output unchanged."""
    model = make_model(variant, randomise=init == "n01", lambda_uncertainty=0.5)
    seq = batch(seed=5, l=9)
    valid = seq > 0
    x_t, t = _fixed_inputs(seq)
    c, x0_hat = _adm_outputs(model, seq, x_t, t)

    # 1) Other noisy targets and a different padding embedding at the padded positions.
    x_t2 = torch.where(valid.unsqueeze(-1), x_t, torch.randn_like(x_t) * 3)
    with torch.no_grad():
        model.item_emb.weight[0] = torch.randn(TINY["hidden_size"])
    c2, x0_hat2 = _adm_outputs(model, seq, x_t2, t)
    torch.testing.assert_close(c2[valid], c[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(x0_hat2[valid], x0_hat[valid], rtol=0, atol=1e-5)

    # 2) Three more padding columns in front: positions are counted from the newest item.
    pad = 3
    seq3 = torch.cat([torch.zeros(seq.shape[0], pad, dtype=torch.long), seq], dim=1)
    x_t3 = torch.cat([torch.randn(seq.shape[0], pad, x_t.shape[-1]), x_t], dim=1)
    t3 = torch.cat([torch.zeros(seq.shape[0], pad, dtype=torch.long), t], dim=1)
    c3, x0_hat3 = _adm_outputs(model, seq3, x_t3, t3)
    torch.testing.assert_close(c3[:, pad:][valid], c[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(x0_hat3[:, pad:][valid], x0_hat[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_packed_rows_give_every_token_its_unpacked_output(variant, init: str) -> None:
    """Several sequences sharing a row (batches.pack) see only themselves: each token's history
    encoding and denoiser output equal those of the left-padded batch."""
    model = make_model(variant, randomise=init == "n01", lambda_uncertainty=0.5)
    seq = batch(seed=11, b=6, l=9)
    valid = seq > 0
    x_t, t = _fixed_inputs(seq)
    c, x0_hat = _adm_outputs(model, seq, x_t, t)

    flat_index = torch.arange(1, seq.numel() + 1).view(seq.shape) * valid  # where each token came from
    packed = pack(seq, flat_index)
    assert packed.seq.shape[0] < seq.shape[0]  # short sequences really share rows
    came_from = packed.tgt[packed.tgt > 0] - 1
    x_t_packed = torch.zeros(*packed.seq.shape, x_t.shape[-1])
    t_packed = torch.zeros_like(packed.seq)
    x_t_packed[packed.tgt > 0] = x_t.reshape(-1, x_t.shape[-1])[came_from]
    t_packed[packed.tgt > 0] = t.flatten()[came_from]
    c_p, ctx = model.encode(packed.seq, packed.segment)
    x0_hat_p, _ = model.adm(c_p, x_t_packed, t_packed, ctx)
    torch.testing.assert_close(c_p[packed.tgt > 0], c.reshape(-1, c.shape[-1])[came_from], rtol=0, atol=1e-5)
    torch.testing.assert_close(x0_hat_p[packed.tgt > 0], x0_hat.reshape(-1, c.shape[-1])[came_from],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_scores_do_not_depend_on_the_batchs_padding(variant, init: str) -> None:
    """A user's scores with fixed noise are the same alone or trimmed into a longer batch."""
    model = make_model(variant, randomise=init == "n01", lambda_uncertainty=0.5)
    seq = batch(seed=6, l=9)
    noise = torch.randn(model.steps + 1, seq.shape[0], TINY["hidden_size"], generator=torch.Generator().manual_seed(0))
    together = model.score_all(seq, noise=noise)
    last = seq.shape[0] - 1  # one item, 8 padding columns in the batch
    alone = model.score_all(seq[last:, -1:], noise=noise[:, last:])
    torch.testing.assert_close(alone[:, 1:], together[last:, 1:], rtol=0, atol=1e-4)


def test_segment_layout_hides_future_padding_and_other_sequences() -> None:
    valid = torch.tensor([[False, True, True], [True, True, True]])
    mask, pos = segment_layout(valid.long())
    assert mask.shape == (2, 1, 3, 3)
    expected_row0 = torch.tensor([[True, False, False], [False, True, False], [False, True, True]])
    assert torch.equal(mask[0, 0], expected_row0)
    assert torch.equal(mask[1, 0], torch.ones(3, 3, dtype=torch.bool).tril())
    assert pos[0, 1:].tolist() == [1, 0] and pos[1].tolist() == [2, 1, 0]
    # A packed row: sequences (a, b) and (c, d, e), then padding.
    mask, pos = segment_layout(torch.tensor([[1, 1, 2, 2, 2, 0]]))
    allowed = [[0], [0, 1], [2], [2, 3], [2, 3, 4], [5]]
    assert [row.nonzero().flatten().tolist() for row in mask[0, 0]] == allowed
    assert pos[0, :5].tolist() == [1, 0, 2, 1, 0]


# --- the cached sampler -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["key", "query"])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("length", [1, 9], ids=lambda l: f"L{l}")
def test_cached_sampler_equals_naive_recompute(variant, length: int, init: str, mode: str) -> None:
    model = make_model(variant, randomise=init == "n01", lambda_uncertainty=0.5, seed=7, padding_mask=mode)
    seq = batch(seed=7, l=length)
    noise = torch.randn(model.steps + 1, seq.shape[0], TINY["hidden_size"], generator=torch.Generator().manual_seed(1))
    fast = model.score_all(seq, noise=noise)
    naive = model.score_all(seq, noise=noise, naive=True)
    assert fast.shape == naive.shape == (seq.shape[0], N_ITEMS + 1)
    assert torch.isfinite(fast[:, 1:]).all()
    assert (fast[:, 1:] - naive[:, 1:]).abs().max() < 1e-4
    assert fast[:, 1:].std() > 1e-3  # not a degenerate constant that would match trivially
    # The sample depends on the noise (so equality above is not an accident of ignoring it).
    other = model.score_all(seq, noise=noise.flip(0))
    assert (other[:, 1:] - fast[:, 1:]).abs().max() > 1e-4


def test_score_all_without_noise_is_random_but_seeded() -> None:
    model = make_model(VARIANTS[0])
    seq = batch(seed=8)
    torch.manual_seed(3)
    a = model.score_all(seq)
    torch.manual_seed(3)
    b = model.score_all(seq)
    assert torch.equal(a, b)


# --- scores of every recommender ----------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_padding_id_is_scored_as_the_authors_or_never_recommended(variant) -> None:
    model = make_model(variant, randomise=False)
    seq = batch(seed=9)
    torch.manual_seed(0)
    scored = model.score_all(seq)
    assert model.cfg.score_padding_item  # the authors' default: column 0 ranks with the items
    assert scored.shape == (seq.shape[0], N_ITEMS + 1) and torch.isfinite(scored).all()
    torch.testing.assert_close(scored[:, 0], torch.zeros(seq.shape[0]))  # E[0] = 0 at initialisation
    model = make_model(variant, randomise=False, score_padding_item=False)
    torch.manual_seed(0)
    scores = model.score_all(seq)
    assert torch.all(scores[:, 0] == -torch.inf)
    assert torch.equal(scores[:, 1:], scored[:, 1:])
    assert torch.all(scores.topk(N_ITEMS, dim=1).indices > 0)


def test_sasrec_scores_and_loss() -> None:
    cfg = TrialConfig(model="sasrec", **TINY)
    torch.manual_seed(0)
    model = build_model(cfg, N_ITEMS)
    assert isinstance(model, SASRec)
    seq = batch(seed=10)
    scores = model.eval().score_all(seq)
    assert scores.shape == (seq.shape[0], N_ITEMS + 1)
    assert torch.isfinite(scores).all()  # column 0 scored too, as the authors' SASRec
    tgt = torch.where(seq > 0, torch.randint(1, N_ITEMS + 1, seq.shape), torch.zeros_like(seq))
    loss, parts = model.train().loss(seq, tgt)
    assert torch.isfinite(loss) and set(parts) == {"ce"}
    # Untrained CE is near ln(N+1): N(0, 0.1) init gives near-uniform logits.
    assert abs(loss.item() - torch.log(torch.tensor(N_ITEMS + 1.0)).item()) < 1.0
    # Causal: the last position's score ignores nothing before, and earlier ones ignore the future.
    model.eval()
    changed = seq.clone()
    changed[:, -1] = changed[:, -1] % N_ITEMS + 1
    h, h2 = model.encode(seq), model.encode(changed)
    torch.testing.assert_close(h2[:, :-1], h[:, :-1], rtol=0, atol=1e-6)


def test_most_popular_scores_are_the_counts() -> None:
    counts = torch.tensor([0.0, 5, 1, 9, 0, 2])
    model = MostPopular(counts)
    scores = model.score_all(torch.ones(3, 7, dtype=torch.long))
    assert scores.shape == (3, 6)
    assert torch.all(scores[:, 0] == -torch.inf)
    assert torch.equal(scores[:, 1:], counts[1:].expand(3, 5))
    assert scores[0].argmax().item() == 3
    assert model.counts[0] == 0  # the model's own buffer is not overwritten by the -inf


def test_build_model_rejects_most_popular() -> None:
    with pytest.raises(ValueError, match=r"model='most_popular' has no trainable network"):
        build_model(TrialConfig(model="most_popular", **TINY), N_ITEMS)


def test_rotary_attention_logits_depend_only_on_relative_position() -> None:
    from adrec.model import Rotary

    rot = Rotary(8)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def logit(m: int, n: int) -> float:
        return float((rot(q, torch.tensor([m])) * rot(k, torch.tensor([n]))).sum())

    assert logit(7, 3) == pytest.approx(logit(4, 0), abs=1e-5)
    assert logit(12, 10) == pytest.approx(logit(2, 0), abs=1e-5)
    assert abs(logit(7, 3) - logit(3, 3)) > 1e-3  # the offset matters
    torch.testing.assert_close(rot(q, torch.tensor([5])).norm(), q.norm())  # a rotation


def test_cpu_dropout_keeps_1_minus_p_scaled_and_is_seeded() -> None:
    from adrec.model import Dropout

    drop = Dropout(0.3).train()
    x = torch.ones(200, 500, requires_grad=True)
    torch.manual_seed(4)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # 100k draws: sd 0.0014
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the gradient passes where the value did, scaled alike
    torch.manual_seed(4)
    assert torch.equal(drop(x), y)  # torch.manual_seed fixes the mask
    assert not torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x)
