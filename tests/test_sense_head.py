"""The attached sense head against hand computations: α from the large model's hidden states, its logits,
the serving path (incremental α from the engine's hidden states, exact skip, sliding window) against
the paper's formula, loading, and the distillation loss."""

import math

import pytest
import torch

from ensemble.edits import PackRef, SenseEdits
from ensemble.ensemble import Ensemble
from ensemble.large_model import model_fingerprint, tiny_gptj
from ensemble.sense_head import SenseHeadConfig, SenseHeadLM, is_sense_head
from ensemble.sense_model import load_sense_model
from ensemble.vocab import Vocabulary

U = Vocabulary.gpt2().size


def tiny_head(large, seed=0, **overrides):
    emb = large.get_output_embeddings().weight
    cfg = dict(
        vocab_size=emb.shape[0],
        n_embd=emb.shape[1],
        context_model="tiny-gptj:1",
        num_senses=4,
        max_distance=8,
        n_positions=64,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    head = SenseHeadLM(SenseHeadConfig(**cfg), large)
    with torch.no_grad():
        head.sense_weight_net.distance_bias.normal_(0, 1.0)  # the bias path must matter in these checks
        head.sense_weight_net.c_attn.weight.normal_(0, 0.3)
    return head.eval()


@pytest.fixture(scope="module")
def pair():
    large = tiny_gptj(seed=1)
    return large, tiny_head(large)


@torch.no_grad()
def hand_alpha(head, hidden):
    """α[ℓ,t,j] by loops: softmax over j ≤ t of q_ℓ(h_t)·k_ℓ(h_j)/sqrt(d_qk) + b_ℓ[min(t−j, D−1)]."""
    w = head.sense_weight_net
    k, hd, s = head.config.num_senses, head.config.head_dim, hidden.shape[0]
    proj = hidden @ w.c_attn.weight.T + w.c_attn.bias  # (s, 2·k·hd): q for every sense, then k for every sense
    q, key = proj[:, : k * hd], proj[:, k * hd :]
    alpha = torch.zeros(k, s, s)
    for sense in range(k):
        for t in range(s):
            scores = []
            for j in range(t + 1):
                dot = float(q[t, sense * hd : (sense + 1) * hd] @ key[j, sense * hd : (sense + 1) * hd])
                scores.append(
                    dot / math.sqrt(hd) + float(w.distance_bias[sense, min(t - j, head.config.max_distance - 1)])
                )
            alpha[sense, t, : t + 1] = torch.softmax(torch.tensor(scores), -1)
    return alpha


def test_alpha_and_logits_equal_hand_computation(pair):
    large, head = pair
    ids = torch.tensor([[464, 3139, 286, 34593, 318, 2493, 5593, 13, 383, 3139, 286, 3576]])
    hidden = large.base_model(ids).last_hidden_state[0]
    alpha = head.contextualize(ids)[0]
    torch.testing.assert_close(alpha, hand_alpha(head, hidden), atol=1e-5, rtol=0)
    senses = head.sense_network(large.get_input_embeddings().weight[ids])[0]  # (k, s, d)
    o = torch.einsum("ktj,kjd->td", alpha, senses)
    torch.testing.assert_close(head(ids).logits[0], o @ large.lm_head.weight.T, atol=1e-4, rtol=1e-5)


def test_padding_rows_equal_single_rows(pair):
    _, head = pair
    rows = [[464, 3139, 286, 34593, 318], [11, 12]]
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    batched = head(ids, attention_mask=mask).logits
    for i, r in enumerate(rows):
        torch.testing.assert_close(batched[i, : len(r)], head(torch.tensor([r])).logits[0], atol=1e-5, rtol=0)


def make_pack(head, tokens, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    k = head.config.num_senses
    tok = torch.tensor([t for t in tokens for _ in range(k)])
    sen = torch.tensor([s for _ in tokens for s in range(k)])
    return SenseEdits(tok, sen, torch.randn(len(tok), head.config.n_embd, generator=g) * scale)


@torch.no_grad()
def naive_logprobs(large, head, tokens, packs, window=None):
    """The paper's formula with full forwards: log_softmax_U(z + Σ β (log_softmax(ft) − log_softmax(pre))), the
    sense model's α over the last `window` sources (all when None)."""
    ids = torch.tensor([tokens])
    z = large(ids).logits[0, -1, :U].float()
    hidden = large.base_model(ids).last_hidden_state[0]
    alpha = hand_alpha(head, hidden)[:, -1]  # (k, s)
    if window is not None:
        alpha = alpha.clone()
        alpha[:, : len(tokens) - window] = 0
        # the window is a softmax over its own sources: renormalise what it sees
        alpha = alpha / alpha.sum(-1, keepdim=True)
    senses = head.sense_network(large.get_input_embeddings().weight[ids])[0]  # (k, s, d)
    E = large.lm_head.weight
    pre = torch.log_softmax(E @ torch.einsum("kj,kjd->d", alpha, senses), -1)
    total = z.clone()
    for p in packs:
        edited = senses.clone()
        for t, s_, d in zip(p.edits.token_ids.tolist(), p.edits.sense_ids.tolist(), p.edits.deltas, strict=True):
            for j, x in enumerate(tokens):
                if x == t:
                    edited[s_, j] += d
        ft = torch.log_softmax(E @ torch.einsum("kj,kjd->d", alpha, edited), -1)
        total += p.beta * (ft - pre)[:U]
    return torch.log_softmax(total, -1)


def decode_and_compare(ens, prompts, packs, steps, window_of=None, join_at=None, budget=None):
    large, head = ens.large, ens.backpack
    batch = ens.new_batch()
    seqs = {}
    for i, (p, pk) in enumerate(zip(prompts, packs, strict=True)):
        if join_at is None or i not in join_at:
            batch.add(i, p, pk)
            seqs[i] = list(p)
    for step in range(steps):
        for i, at in (join_at or {}).items():
            if at == step:
                batch.add(i, prompts[i], packs[i])
                seqs[i] = list(prompts[i])
        lp = batch.logprobs(budget)
        for row, sid in enumerate(batch.seq_ids):
            window = window_of(len(seqs[sid])) if window_of else None
            ref = naive_logprobs(large, head, seqs[sid], packs[sid], window)
            torch.testing.assert_close(lp[row], ref, atol=2e-5, rtol=0)
        nxt = lp.argmax(-1).tolist()
        for sid, t in zip(batch.seq_ids, nxt, strict=True):
            seqs[sid].append(t)
        batch.append(dict(zip(batch.seq_ids, nxt, strict=True)))
    return seqs


def test_serving_path_equals_naive_formula(pair, tokenizer):
    large, head = pair
    ens = Ensemble(large, head, tokenizer)
    prompts = [
        tokenizer("The capital of Mauritius is").input_ids,
        tokenizer("A long unrelated sentence about the weather").input_ids,
        tokenizer("Mauritius").input_ids,
    ]
    trig = tokenizer(" Mauritius").input_ids + tokenizer("Mauritius").input_ids
    pack = PackRef("p", "v1", make_pack(head, trig, 0), 0.7)
    other = PackRef("q", "v1", make_pack(head, tokenizer(" the").input_ids, 1), 1.3)
    packs = [[pack], [pack, other], [other]]
    decode_and_compare(ens, prompts, packs, steps=8, join_at={2: 3})
    assert ens.stats.exact_skip_rows > 0  # the unrelated prompt ran without the head until an edited token


def test_chunked_prefill_keeps_the_head_exact(pair, tokenizer):
    """A long prompt prefilled 3 tokens per step beside decoding rows: the hidden states reach the head chunk
    by chunk, and every row still equals the naive formula once its prompt is in."""
    large, head = pair
    ens = Ensemble(large, head, tokenizer)
    long = tokenizer(" Mauritius is an island nation in the Indian Ocean, and the capital of Mauritius is").input_ids
    prompts = [tokenizer("The capital of Mauritius is").input_ids, long, tokenizer("Mauritius").input_ids]
    trig = tokenizer(" Mauritius").input_ids + tokenizer("Mauritius").input_ids
    pack = PackRef("p", "v1", make_pack(head, trig, 0), 0.7)
    seqs = decode_and_compare(ens, prompts, [[pack], [pack], []], steps=12, join_at={1: 1, 2: 2}, budget=3)
    assert len(seqs[1]) > len(long)  # the long row finished its prefill and decoded


def test_edited_token_generated_later_activates_the_head(pair, tokenizer):
    """A row with no edited token is an exact skip; once the engine appends one, α comes from hidden states the
    tracker kept for the row's window, and matches the full formula from then on."""
    large, head = pair
    ens = Ensemble(large, head, tokenizer)
    prompt = tokenizer("One two three").input_ids
    batch = ens.new_batch()
    base = ens.new_batch()
    greedy = None
    for b in (base,):
        b.add(0, prompt, [])
        greedy = b.logprobs().argmax(-1).tolist()
    first = greedy[0]
    pack = PackRef("p", "v1", make_pack(head, [first], 3), 1.0)
    batch.add(0, prompt, [pack])
    seq = list(prompt)
    lp = batch.logprobs()
    torch.testing.assert_close(lp[0], base.logprobs()[0])  # nothing edited yet: bit-for-bit the base
    for _ in range(4):
        t = int(lp[0].argmax())
        seq.append(t)
        batch.append({0: t})
        lp = batch.logprobs()
        torch.testing.assert_close(lp[0], naive_logprobs(large, head, seq, [pack]), atol=2e-5, rtol=0)


def test_window_slides_past_n_positions(tokenizer):
    large = tiny_gptj(seed=1)
    head = tiny_head(large, n_positions=12)
    ens = Ensemble(large, head, tokenizer, window_keep=8)
    prompt = tokenizer("Mauritius is an island").input_ids
    pack = PackRef("p", "v1", make_pack(head, tokenizer("Mauritius").input_ids, 0), 1.0)
    cap, keep = 12, 8

    def window(n):
        return n if n <= cap else keep + (n - cap - 1) % (cap - keep) + 1

    decode_and_compare(ens, [prompt], [[pack]], steps=14, window_of=window)
    assert ens.stats.window_reprefills > 0


def test_save_load_round_trip_checks_the_large_model(tmp_path, pair):
    large, _ = pair
    head = tiny_head(large)
    head.config.context_fingerprint = model_fingerprint(large)
    head.save_pretrained(tmp_path / "h")
    assert is_sense_head(tmp_path / "h")
    again = load_sense_model(tmp_path / "h", large=large)
    assert isinstance(again, SenseHeadLM)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(again(ids).logits, head(ids).logits)
    assert again.fingerprint() == head.fingerprint()
    with pytest.raises(ValueError, match="context_fingerprint"):
        load_sense_model(tmp_path / "h", large=tiny_gptj(seed=2))
    (tmp_path / "h" / "config.json").write_text('{"architectures": ["SenseHeadLM"], "vocab_size": 3}')
    with pytest.raises(ValueError, match="missing key"):
        load_sense_model(tmp_path / "h", large=large)


def test_ensemble_refuses_a_head_of_another_large_model(pair, tokenizer):
    _, head = pair
    with pytest.raises(ValueError, match="hidden states of"):
        Ensemble(tiny_gptj(seed=5), head, tokenizer)


def test_distillation_loss_equals_hand_value(pair):
    from train_edits.sense_head_trainer import batch_loss

    large, head = pair
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    hidden = large.base_model(ids).last_hidden_state
    logits = head(ids).logits[:, :-1, :U]
    logp = torch.log_softmax(logits, -1)
    teacher_lp = torch.log_softmax(large(ids).logits[:, :-1, :U], -1)
    lp, top = teacher_lp.topk(3, dim=-1)
    teacher = {"hidden": hidden, "ids": top.to(torch.int32), "logprobs": lp}
    loss, ce, kd = batch_loss(head, ids, teacher, U, 0.25)
    ce_hand = -sum(float(logp[b, t, ids[b, t + 1]]) for b in range(2) for t in range(3)) / 6
    kd_hand = 0.0
    for b in range(2):
        for t in range(3):
            q = torch.softmax(lp[b, t], -1)
            kd_hand -= float(sum(q[i] * logp[b, t, top[b, t, i]] for i in range(3)))
    kd_hand /= 6
    assert float(ce) == pytest.approx(ce_hand, rel=1e-5)
    assert float(kd) == pytest.approx(kd_hand, rel=1e-5)
    assert float(loss) == pytest.approx(0.75 * ce_hand + 0.25 * kd_hand, rel=1e-5)


@pytest.fixture
def head_folders(tmp_path, pair):
    """A tiny GPT-J folder and a sense head folder trained (here: built) on it, as a server config names them."""
    large, _ = pair
    head = tiny_head(large)
    large.save_pretrained(tmp_path / "large")
    from ensemble.large_model import load_large_model

    head.config.context_model = str(tmp_path / "large")
    head.config.context_fingerprint = model_fingerprint(load_large_model(str(tmp_path / "large"), dtype="float32"))
    head.save_pretrained(tmp_path / "head")
    return tmp_path / "large", tmp_path / "head"


def test_embedded_server_attaches_the_head_to_its_one_large_model(head_folders, tokenizer):
    from serve.config import ModelConfig
    from serve.models import build_served

    large_dir, head_dir = head_folders
    served = build_served(ModelConfig(profile="pretrained", large_model=str(large_dir), backpack=str(head_dir)))
    ens = served.ensemble
    assert ens is not None and isinstance(ens.backpack, SenseHeadLM)
    assert ens.backpack.large is ens.large  # one copy: the head reads the served model's own hidden states
    prompt = tokenizer("The capital of Mauritius is").input_ids
    pack = PackRef("p", "v1", make_pack(ens.backpack, prompt[-2:], 0), 1.0)
    out = ens.generate_greedy([prompt], [[pack]], 4)[0]
    seq = list(prompt)
    for t in out:  # each greedy token is the argmax of the paper's formula on the served models
        assert t == int(naive_logprobs(ens.large, ens.backpack, seq, [pack]).argmax())
        seq.append(t)


def test_vllm_engine_refuses_a_sense_head_at_startup(head_folders):
    from sensepack_common.errors import ConfigError
    from serve.config import ModelConfig
    from serve.models import build_served

    large_dir, head_dir = head_folders
    cfg = ModelConfig(profile="pretrained", large_model=str(large_dir), backpack=str(head_dir))
    with pytest.raises(ConfigError, match=r"model.backpack: .* is a sense head.*engine: embedded"):
        build_served(cfg, large_from_checkpoint=str(large_dir))
