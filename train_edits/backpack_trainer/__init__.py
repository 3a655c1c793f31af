"""Train a Backpack LM from scratch for any tokenizer.

    train_edits backpack train corpus.jsonl --tokenizer smollm2-135m-instruct --out runs/bp --max-steps 2000
    torchrun --nproc_per_node 2 -m train_edits backpack train corpus.jsonl ...   (DDP, same flags)

Python API: ``trainer.train_backpack(config.BackpackTrainConfig(...)) -> Path`` (the output folder).

    config.py       BackpackTrainConfig, its validation, TrainConfigError
    data.py         documents → train and held-out token blocks; the block order
    distill.py      the CE / KD loss, the teacher (top-k per batch or cached on disk), embedding init
    distributed.py  DistEnv (rank, collectives), device, autocast
    trainer.py      train_backpack and the loop: init, resume, step, evaluate, checkpoint, outputs

Data. Documents (JSONL ``text`` field, ``.jsonl.gz``, ``.txt``, or a streamed Hugging Face
dataset) are shuffled with ``seed`` and split **by document** into train and held-out. Each
side's documents are tokenized without BOS, each preceded by the tokenizer's document
separator (``Vocabulary.from_tokenizer(tok).doc_sep_id``), concatenated in the shuffled order
and cut into consecutive blocks of ``block_len`` tokens (the last partial block is dropped).
Block order: epoch e visits the train blocks in ``randperm(n, seed + 7919·(e+1))`` order; the
global sample counter is the whole data position, so resume and world size change nothing.

Model. ``BackpackConfig`` from the options; vocab_size = |U| = len(tokenizer) rounded up to a
multiple of ``pad_vocab_multiple`` (rows ≥ |U| are padding: never input, never scored).

Loss, per scored position (b, t) — token x_{t+1} predicted from x_{≤t}; N positions, block
position 0 is never a target:

    p_θ        = softmax over U of the student's logits z[:, :|U|]
    CE         = (1/N) Σ −log p_θ(x_{t+1})
    q_{t,i}    = exp(ℓ_{t,i}) / Σ_{j≤k} exp(ℓ_{t,j})        ℓ: the teacher's top-k log_softmax_U values,
                                                             K_{t,i}: their ids (renormalised top-k)
    KD         = (1/N) Σ −Σ_i q_{t,i} log p_θ(K_{t,i})       (cross-entropy; = KL(q ‖ p_θ|K) + H(q))
    loss       = (1 − w)·CE + w·KD                          (w = distill_weight; w = 0 without a teacher)

Held-out NLL: the same CE over every held-out block (first token of each block not scored),
micro-averaged per token, in nats; ppl = exp(NLL).

Optimisation. AdamW; weight decay on the 2-D weights of the transformer and sense network
only (not on biases, LayerNorms or the embeddings, whose rows are also the tied LM head and
would shrink when rarely seen). Linear warmup over ``warmup_steps`` to ``lr``, then cosine
decay to ``min_lr_ratio·lr`` at ``decay_steps`` (default: the step budget; with only
``max_minutes`` the cosine follows elapsed time, which is not reproducible). Gradient
clipping on the global norm; ``grad_accum`` micro-steps per optimizer step; bf16 autocast on
CUDA only.

Distributed. Under torchrun (WORLD_SIZE > 1) the process group is gloo on CPU, nccl on CUDA,
and the model is wrapped in DDP. Each optimizer step's ``batch_size`` blocks (global) are cut
into ``grad_accum`` micro-batches and each micro-batch into ``world_size`` equal rank slices:
every rank's loss is its slice's mean, and DDP's gradient average makes the update the global
mean, the same as one process (up to summation order). Dropout (off by default) is seeded
per (step, micro-step, rank), so resume is exact with it too, but 1 vs N processes then
differ. Only rank 0 writes files, plots and progress bars.

Checkpoints (``out/checkpoints/step-N.pt``): model, optimizer, step, data position, RNG
states, elapsed seconds and history; world-size independent, so a run may resume on another
number of processes with the same global batch.
"""
