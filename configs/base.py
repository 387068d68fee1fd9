"""Every jaxlm config key, declared once, with its default and what it means.

    jaxlm train --config=configs/base.py --workdir=runs/base

Presets import this file and change only what differs: `from jaxlm.configs import base`.
The CLI overrides any key declared here with `--config.group.key=value`; a key not declared here
is rejected. Types come from the defaults below (a `placeholder(int)` is an int that may be None).
Validation rules (ranges, choices, relations between keys) live in `jaxlm/config.py`.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()

    c.model = m = config_dict.ConfigDict()
    m.vocab_size = 32000  # rows of the embedding table; >= the tokenizer's vocabulary
    m.d_model = 768  # width of the residual stream
    m.num_layers = 12  # decoder blocks
    m.num_heads = 12  # query heads
    m.num_kv_heads = 12  # key/value heads (grouped-query attention); divides num_heads
    m.head_dim = config_dict.placeholder(int)  # None: d_model // num_heads
    m.mlp_dim = 2048  # hidden width of the SwiGLU MLP
    m.max_seq_len = 2048  # longest sequence the model is meant for (RoPE has no table to size)
    m.rope_theta = 10000.0  # RoPE base frequency
    m.norm_eps = 1e-5  # epsilon inside RMSNorm
    m.tie_embeddings = False  # output projection reuses the embedding table
    m.init_std = 0.02  # std of normal weight init; output projections use init_std / sqrt(2 * num_layers)
    m.dtype = "float32"  # compute dtype of matmuls and activations (bfloat16 on accelerators)
    m.param_dtype = "float32"  # storage dtype of parameters and optimizer state
    m.scan_layers = True  # run the stacked layers with lax.scan (fast compile) instead of a Python loop
    m.remat = "none"  # recompute in backward: none | full | save_dots | save_attn (see model.py)
    m.attention = "xla"  # xla (blockwise jnp, anywhere) | cudnn (NVIDIA GPU, bf16) | splash (TPU) | auto
    m.num_labels = 0  # > 0: a classifier, a score head [num_labels, d_model] instead of the LM output layer
    #                  (set from classify.labels by classification runs; see jaxlm/classify.py)

    c.data = d = config_dict.ConfigDict()
    # stdlib (embedded corpus) | local (data.files) | sft (data.files) | stdlib_sft (demo SFT rows)
    # | classify (data.files) | stdlib_classify (demo classification rows) | a prepared TFDS name, e.g. c4/en
    d.dataset = "stdlib"  # which text (see above)
    d.data_dir = "~/.cache/jaxlm/data"  # where TFDS datasets and tokenizers are prepared and read
    d.tokenizer = ""  # sentencepiece model path; "" = train one for the dataset on first use
    d.seq_len = 1024  # tokens per packed training row; <= model.max_seq_len
    d.files = ""  # local: glob of .txt (a document per file) or .jsonl (one per line); sft, classify: rows
    d.eval_files = ""  # sft, classify: glob of validation .jsonl files; "" = hold out 3% of data.files' rows
    d.chat_template = "<|{role}|>\n{content}\n"  # sft: how each chat message is written (see jaxlm/sft.py)
    d.too_long = "truncate_prompt"  # sft: a row over seq_len + 1 tokens (classify: seq_len): truncate_prompt
    #                                (classify: keeps the text's start) | drop
    d.bad_rows = "error"  # sft, classify: a malformed row or unknown label: error (names file:line) | skip
    d.text_field = "text"  # the text's field in local .jsonl lines, or feature of a TFDS dataset
    d.local_name = "my_text"  # dataset=local: the name the files are prepared under
    d.train_split = "train"  # split read for training
    d.eval_split = "validation"  # split read for evaluation (deterministic, finite)
    # Cleaning at prepare time, for stdlib and local (jaxlm/cleaning.py says the order of the steps):
    d.clean = True  # False: none of the steps below, the text is prepared as read
    d.clean_nfc = True  # Unicode NFC normalisation
    d.clean_control = True  # drop control characters other than newline and tab (\r included)
    d.min_chars = 64  # drop documents shorter than this (characters, after normalising); 0 = off
    d.max_chars = 1_000_000  # drop documents longer than this; 0 = off
    d.max_replacement_share = 0.01  # drop documents with more U+FFFD than this share (binary); 1.0 = off
    d.max_line_chars = 1000  # drop documents with a longer line (minified, generated data); 0 = off
    d.dedup_exact = True  # drop a document whose text repeats a kept one exactly
    d.dedup_near = 0.8  # drop one whose MinHash Jaccard similarity to a kept one is at least this; 0 = off
    d.dedup_num_perm = 128  # MinHash permutations (more: a finer similarity estimate, slower)
    d.dedup_shingle = 5  # words per shingle in the MinHash
    d.streams = 0  # independent input streams (0 = one per process); fixed, data order ignores process count

    c.optim = o = config_dict.ConfigDict()
    o.lr = 3e-4  # peak learning rate
    o.schedule = "cosine"  # learning-rate shape after warmup: constant | cosine | linear | wsd
    o.warmup_steps = 100  # linear warmup from 0 to lr
    o.weight_decay = 0.1  # AdamW decoupled weight decay
    o.clip_norm = 1.0  # clip gradients to this global norm; 0 disables clipping
    o.grad_accum_steps = 1  # microbatches accumulated into one optimizer step
    o.min_lr_ratio = 0.1  # the schedule ends at lr * min_lr_ratio (cosine, linear, wsd)
    o.decay_fraction = 0.2  # wsd: share of the steps spent in the final linear decay
    o.b1 = 0.9  # Adam first-moment decay
    o.b2 = 0.95  # Adam second-moment decay
    o.eps = 1e-8  # Adam epsilon
    o.decay_embeddings = False  # apply weight decay to the embedding table too
    o.z_loss = 0.0  # weight of the z-loss, mean(logsumexp(logits)^2); 0 disables it

    c.loss = w = config_dict.ConfigDict()  # extra terms of the LM objective (jaxlm/objectives.py)
    w.attention_entropy = 0.0  # lambda x mean attention entropy: > 0 concentrates, < 0 spreads (xla kernel)
    w.focal_gamma = 0.0  # token focal loss: cross-entropy x (1 - p)^gamma; 0 = plain cross-entropy
    w.sequence_weighting = ""  # per packed document: "" = off | mean_loss (weight harder documents more)
    w.sequence_beta = 1.0  # sequence weighting: weight ~ (document mean loss / batch mean)^beta
    w.sequence_cap = 4.0  # sequence weighting: a document's relative weight is capped here before normalising

    c.distill = z = config_dict.ConfigDict()  # knowledge distillation from a teacher model
    z.teacher = ""  # a jaxlm workdir (DIR or DIR:STEP) or HF directory with the same vocabulary; "" = off
    z.temperature = 2.0  # softmax temperature T of both distributions in the KL term
    z.alpha = 0.5  # loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy

    c.train = t = config_dict.ConfigDict()
    t.steps = 1000  # optimizer steps
    t.global_batch_size = 32  # rows per optimizer step, summed over all devices and hosts
    t.seed = 0  # seed of parameter init and data order
    t.init_from = ""  # start from a model: a workdir (DIR or DIR:STEP, params only) or HF dir; "" = none
    t.log_every = 10  # steps between metric lines
    t.eval_every = 200  # steps between validation passes (one also runs at the end)
    t.eval_batches = 0  # validation batches per pass; 0 = the whole validation split
    t.eval_tasks = ""  # lm-eval tasks run at each evaluation, comma-separated (e.g. "stdlib_mc"); "" = none
    t.eval_task_limit = 0  # examples per task in those runs; 0 = all
    t.early_stop_patience = 0  # stop after this many evaluations without a better best_metric; 0 = off
    t.profile_steps = 0  # steps traced by jax.profiler into WORKDIR/profile, after the compiling one; 0 = off
    t.peak_tflops = 0.0  # per-device peak for MFU; 0 = the device table, or a measured matmul on CPU

    c.lora = r = config_dict.ConfigDict()
    r.rank = 0  # LoRA rank: train low-rank factors of the targets only, the rest frozen; 0 = off
    r.alpha = 16.0  # LoRA scale numerator: the update is (alpha / rank) x B A
    r.targets = "q,k,v,o,gate,up,down"  # the block matmuls adapted, comma-separated
    r.rslora = False  # scale alpha / sqrt(rank) instead (rank-stabilized LoRA)
    r.base_dtype = ""  # storage dtype of the frozen base (e.g. bfloat16); "" = model.param_dtype

    c.classify = y = config_dict.ConfigDict()
    y.labels = ""  # the label names, comma-separated, in class-index order; "" = stdlib_classify's packages

    c.checkpoint = k = config_dict.ConfigDict()
    k.every = 200  # steps between checkpoints (one is always written at the end)
    k.keep = 3  # most recent checkpoints kept on disk
    k.best_metric = ""  # also keep the best evaluation's checkpoint in WORKDIR/best, by this metric; "" = off
    k.best_mode = "min"  # min (losses, perplexity, bits per byte) | max (accuracy)

    c.mesh = s = config_dict.ConfigDict()
    s.data = -1  # data-parallel replicas; -1 = fill with the devices left over
    s.stage = 1  # pipeline stages
    s.fsdp = 1  # fully sharded data parallel: params and optimizer state sharded
    s.tensor = 1  # tensor (Megatron) parallel
    s.sequence_parallel = False  # with tensor > 1: split activations between blocks along length too
    s.pipeline_microbatches = 0  # with stage > 1: microbatches per pipelined batch; 0 = 2 x stage

    return c
