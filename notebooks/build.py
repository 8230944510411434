"""Writes the notebooks in this folder from the cell lists below, without outputs: `python notebooks/build.py`.

The .ipynb files are generated so that a change to a notebook is a reviewable change to this file. Each notebook has
two modes: the real one (what a Colab user runs: hub ids, an accelerator, longer runs) and a smoke mode
(`DSPARK_SMOKE=1`: tiny local models, few steps, a 2-core CPU) which tests/test_notebooks.py executes.
`python notebooks/build.py --check` exits 1 when a committed notebook differs from what this file writes.
"""

from __future__ import annotations

import os
import sys

import nbformat

REPO_SLUG = "OWNER/dspark_jax"  # GitHub owner/name the Colab links and the install cell point at
HERE = os.path.dirname(os.path.abspath(__file__))


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{REPO_SLUG}/blob/main/notebooks/{name}.ipynb"


def header(name: str, title: str, body: str) -> str:
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(name)})"
    return f"# {title}\n\n{badge}\n\n{body.strip()}\n"


# The first code cell of every notebook: the mode switch and, on a fresh runtime, the install.
SETUP = f"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import time

SMOKE = os.environ.get("DSPARK_SMOKE") == "1"  # the test suite's mode: tiny local models, few steps, CPU
REPO = "https://github.com/{REPO_SLUG}"
NOTEBOOK_START = time.perf_counter()

if importlib.util.find_spec("dspark_jax") is None:
    # A fresh runtime (Colab): the package from GitHub, plus the JAX build for the attached accelerator.
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        accelerator = ["jax[tpu]>=0.10.2,<0.12"]
    elif shutil.which("nvidia-smi"):
        accelerator = ["jax[cuda12]>=0.10.2,<0.12"]
    else:
        accelerator = []
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", f"dspark_jax @ git+{{REPO}}", *accelerator])

import jax  # noqa: E402

DTYPE = "float32" if jax.default_backend() == "cpu" else "bfloat16"  # CPUs have no fast bfloat16 matmuls
devices = f"{{jax.device_count()}} x {{jax.devices()[0].device_kind}}"
print(f"smoke mode: {{SMOKE}} | JAX {{jax.__version__}} on {{devices}} | {{DTYPE}}")
"""

FOOTER = """
wall, cpu = time.perf_counter() - NOTEBOOK_START, time.process_time()
print(f"notebook ran in {wall:.0f} s ({cpu:.0f} s of CPU in this kernel)")
"""

# Prompts the embedded pair (trained on Python source) continues sensibly.
CODE_PROMPTS = '''
CODE_PROMPTS = [
    'def fibonacci(n):\\n    """Return the n-th Fibonacci number."""\\n',
    'class Stack:\\n    """A last-in, first-out stack."""\\n\\n    def __init__(self):\\n',
    "import os\\n\\n\\ndef list_python_files(folder):\\n",
    'def read_json(path):\\n    """Load a JSON file and return its content."""\\n',
]
'''

# ---------------------------------------------------------------------------------------------------- 01 quickstart

QUICKSTART = [
    (
        "md",
        header(
            "01_quickstart",
            "Quick start: speculative decoding with the embedded pair",
            """
This notebook loads the pair that ships inside the package (`dspark_jax/assets/tiny_code/`: a 20 M-parameter
Qwen3-architecture target trained on Python source and a DSpark draft trained against it), generates the same
continuations with and without the draft, and shows

* that greedy speculative output equals plain output token for token, and the speed of each;
* the **per-round acceptance**: how many tokens each round committed (accepted drafts + the target's own token);
* the **per-slot acceptance**: how often slot *j* of the drafted block survives (prefix survival) and how often it
  is accepted once slots 0..j-1 were (conditional acceptance, the paper's Figure 2).

Everything runs offline; on a CPU it takes about a minute. Smoke mode (`DSPARK_SMOKE=1`) uses fewer prompts and
tokens.
""",
        ),
    ),
    ("code", SETUP),
    ("md", "## Load the embedded target and draft"),
    (
        "code",
        """
from importlib.resources import files

import matplotlib.pyplot as plt
import numpy as np

import dspark_jax as dj
from dspark_jax.metrics import speculative_metrics

PAIR = files("dspark_jax") / "assets" / "tiny_code"
target = dj.load_target(str(PAIR / "target"), dtype=DTYPE)
draft = dj.load_draft(str(PAIR / "dspark"), target=target)
t, d = target.config, draft.config
print(f"target: {t.num_hidden_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}")
print(f"draft: {d.model.num_hidden_layers} layer, block {d.block_size}, features of target layers {d.target_layer_ids}")
""",
    ),
    (
        "md",
        "## Speculative and plain decoding, side by side\n\nGreedy decoding (temperature 0), one prompt at a time "
        "(batch 1). The first call of each mode compiles the decoding loop; the timed calls after it reuse it.",
    ),
    ("code", CODE_PROMPTS),
    (
        "code",
        """
TEXTS = CODE_PROMPTS[:2] if SMOKE else CODE_PROMPTS
MAX_NEW = 48 if SMOKE else 128
REPS = 1 if SMOKE else 3
prompts = [target.tokenizer.encode_prompt(text) for text in TEXTS]


def best_of(draft, prompt, **kw):
    \"\"\"The fastest of REPS runs (noise only ever adds time).\"\"\"
    runs = [dj.generate(target, draft, prompts=[prompt], max_new_tokens=MAX_NEW, **kw) for _ in range(REPS)]
    return min(runs, key=lambda r: r.seconds)


for p in prompts:  # compile both modes (each prompt-length bucket has its own prefill)
    for mode in (draft, None):
        dj.generate(target, mode, prompts=[p], max_new_tokens=MAX_NEW)

spec_runs = [best_of(draft, p) for p in prompts]
plain_runs = [best_of(None, p) for p in prompts]
print(f"{'prompt':>6} {'tokens':>6} {'plain tok/s':>11} {'DSpark tok/s':>12} {'speedup':>7} {'tau':>5} {'same':>5}")
for i, (s, p) in enumerate(zip(spec_runs, plain_runs)):
    same = s.tokens == p.tokens
    rate_s, rate_p = s.new_tokens / s.seconds, p.new_tokens / p.seconds
    speedup = rate_s / rate_p
    print(f"{i:>6} {s.new_tokens:>6} {rate_p:>11.1f} {rate_s:>12.1f} {speedup:>6.2f}x {s.tau:>5.2f} {same!s:>5}")
    assert same, "greedy speculative decoding must reproduce plain greedy decoding"
total = sum(p.seconds for p in plain_runs) / sum(s.seconds for s in spec_runs)
print(f"overall speedup {total:.2f}x")
""",
    ),
    (
        "code",
        """
print(TEXTS[0] + target.tokenizer.decode(spec_runs[0].tokens[0]))
""",
    ),
    (
        "md",
        "## Per-round acceptance\n\nEach bar is one round of the first prompt: the tokens it committed. The grey "
        "outline is the most a round can commit (the drafts sent to verification + 1).",
    ),
    (
        "code",
        """
run = spec_runs[0]
committed = np.array(run.acceptance_lengths[0])
possible = np.array(run.proposal_lengths[0]) + 1
rounds = np.arange(1, committed.size + 1)
fig, ax = plt.subplots(figsize=(10, 3))
ax.bar(rounds, possible, color="none", edgecolor="grey", label="drafts verified + 1")
ax.bar(rounds, committed, color="tab:blue", label="committed")
ax.set_xlabel("round")
ax.set_ylabel("tokens")
ax.set_title(f"prompt 0: {committed.sum()} tokens in {committed.size} rounds (tau {committed.mean():.2f})")
ax.legend(loc="upper right")
plt.show()
""",
    ),
    (
        "md",
        "## Per-slot acceptance\n\nOver every round of every prompt (spec §7.1). A sampled run (temperature 1) "
        "is added: the draft is judged against the target's distribution instead of its argmax, so fewer drafts pass.",
    ),
    (
        "code",
        """
def slot_metrics(runs):
    acc = [a for r in runs for a in r.acceptance_lengths]
    prop = [p for r in runs for p in r.proposal_lengths]
    return speculative_metrics(acc, prop, draft.config.block_size)


greedy = slot_metrics(spec_runs)
sampled = slot_metrics(
    [dj.generate(target, draft, prompts=[p], max_new_tokens=MAX_NEW, temperature=1.0) for p in prompts]
)
slots = np.arange(draft.config.block_size)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
for ax, key in zip(axes, ("prefix_survival", "conditional_acceptance")):
    title = key.replace("_", " ")
    ax.plot(slots, greedy[key], "o-", label=f"T = 0 (tau {greedy['tau']:.2f})")
    ax.plot(slots, sampled[key], "s--", label=f"T = 1 (tau {sampled['tau']:.2f})")
    ax.set_xlabel("slot j")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
axes[0].set_ylabel("fraction of rounds")
axes[0].legend()
plt.show()
""",
    ),
    ("code", FOOTER),
]

# ------------------------------------------------------------------------------------------- 02 real checkpoints

REAL = [
    (
        "md",
        header(
            "02_real_checkpoints",
            "Real checkpoints: Qwen3-4B with its DSpark draft",
            """
Run this on a Colab TPU or GPU runtime (*Runtime → Change runtime type*). It

1. installs `dspark_jax` (and the JAX build for the accelerator);
2. downloads a released pair from the Hugging Face hub: the target `Qwen/Qwen3-4B` and its DSpark draft
   `deepseek-ai/dspark_qwen3_4b_block7` (safetensors and JSON only; pickles are never fetched);
3. plans the memory and converts both to **sharded orbax checkpoints** on the notebook's device mesh
   (`python -m conversion.convert`, one tensor at a time);
4. loads them sharded, generates from a chat prompt, and runs a small benchmark: plain vs speculative tokens/s and
   the speedup.

Qwen3-4B needs about 8 GB of accelerator memory in bfloat16 plus 1.2 GB for the draft. In smoke mode
(`DSPARK_SMOKE=1`) the embedded tiny pair stands in for the hub ids and everything runs on a CPU.
""",
        ),
    ),
    ("code", SETUP),
    ("md", "## The pair and the mesh"),
    (
        "code",
        """
import json
import math
import tempfile
from importlib.resources import files

import numpy as np
from safetensors import safe_open

import dspark_jax as dj
from dspark_jax.loading import resolve
from dspark_jax.sharding import make_mesh

if SMOKE:
    PAIR = files("dspark_jax") / "assets" / "tiny_code"
    TARGET_ID, DRAFT_ID = str(PAIR / "target"), str(PAIR / "dspark")
else:
    TARGET_ID, DRAFT_ID = "Qwen/Qwen3-4B", "deepseek-ai/dspark_qwen3_4b_block7"

start = time.perf_counter()
target_src, draft_src = resolve(TARGET_ID), resolve(DRAFT_ID)  # hub ids download once into the HF cache
print(f"checkpoints ready in {time.perf_counter() - start:.0f} s:\\n  {target_src}\\n  {draft_src}")
with open(os.path.join(target_src, "config.json")) as f:
    target_hf = json.load(f)

# Tensor parallelism over every device: the 'model' axis shards heads, MLP and vocabulary, so it must divide the
# number of KV heads.
n_dev = jax.device_count()
model_axis = math.gcd(n_dev, target_hf["num_key_value_heads"])
MESH = f"data=1,model={model_axis}"
mesh = make_mesh(MESH)
print(f"mesh {dict(mesh.shape)} over {n_dev} device(s)")
""",
    ),
    (
        "md",
        "## Memory plan\n\nParameter and KV-cache bytes per device on this mesh, computed from the configs and "
        "the safetensors headers (no tensor is loaded).",
    ),
    (
        "code",
        """
from dspark_jax.memory_plan import plan_checkpoint


def param_count(folder):
    total = 0
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, "np") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


n_target, n_draft = param_count(target_src), param_count(draft_src)
print(f"target {n_target / 1e6:,.1f} M params, draft {n_draft / 1e6:,.1f} M")
print("(the draft's embedding / LM-head copies are bound to the target's arrays when loaded)")
# The planner the CLIs run before loading: params + KV cache on the fullest device, from config.json alone.
for batch, context in ((1, 4096), (8, 4096), (32, 8192)):
    plan = plan_checkpoint(target_src, mesh, DTYPE, context=context, batch=batch)
    print(plan.describe(), "" if plan.fits else "  <- does not fit")
""",
    ),
    (
        "md",
        "## Convert to sharded orbax checkpoints\n\nStreams one tensor at a time into arrays laid out on the "
        "mesh and writes orbax folders that `dj.load_target` / `dj.load_draft` read directly (no second conversion "
        "on the next start). Same as `python -m conversion.convert --src ... --dst ... --mesh ...` in a shell.",
    ),
    (
        "code",
        """
# The CLI's main() in this process: a TPU belongs to one process at a time, and this kernel already holds it.
from conversion.convert import main as convert

WORK = tempfile.mkdtemp(prefix="dspark_") if SMOKE else os.path.abspath("dspark_work")  # /content/... on Colab
target_dst, draft_dst = os.path.join(WORK, "target_orbax"), os.path.join(WORK, "draft_orbax")

for src, dst in ((target_src, target_dst), (draft_src, draft_dst)):
    if os.path.isdir(dst):
        print(f"{dst} exists, kept")
        continue
    start = time.perf_counter()
    argv = ["--src", src, "--dst", dst, "--dtype", DTYPE, "--mesh", MESH]
    print("python -m conversion.convert " + " ".join(argv))
    assert convert(argv) == 0
    print(f"  {time.perf_counter() - start:.0f} s")
# The draft's calibration (spec §10, used by verify="scheduler") travels beside its weights.
if os.path.isfile(os.path.join(draft_src, "calibration.json")):
    shutil.copy(os.path.join(draft_src, "calibration.json"), draft_dst)
""",
    ),
    ("md", "## Load sharded and generate"),
    (
        "code",
        """
start = time.perf_counter()
target = dj.load_target(target_dst, dtype=DTYPE, mesh=mesh)
draft = dj.load_draft(draft_dst, target=target)
print(f"loaded in {time.perf_counter() - start:.0f} s")
q = target.state["layers"][0]["self_attn"]["q_proj"][...]
print(f"a query projection {q.shape}: {q.sharding.spec} on {len(q.sharding.device_set)} device(s)")

if SMOKE:
    QUESTIONS = ["def fibonacci(n):\\n    '''Return the n-th Fibonacci number.'''\\n", "import os\\n\\n\\n"]
else:
    QUESTIONS = [
        "Write a Python function that checks whether a string is a palindrome.",
        "Explain in three sentences why the sky is blue.",
        "A train travels 120 km in 1.5 hours. What is its average speed? Show your steps.",
        "List five prime numbers greater than 100.",
    ]
prompts = [target.tokenizer.encode_prompt(q) for q in QUESTIONS]  # chat template when the tokenizer has one
MAX_NEW = 32 if SMOKE else 256
result = dj.generate(target, draft, prompts=prompts[:1], max_new_tokens=MAX_NEW)
print(target.tokenizer.decode(result.tokens[0]))
print(f"\\ntau {result.tau:.2f} (tokens per target pass)")
""",
    ),
    (
        "md",
        "## A small benchmark\n\nGreedy, one prompt at a time; every prompt runs once in each mode before the "
        "timed runs, so compilation is not timed.",
    ),
    (
        "code",
        """
import matplotlib.pyplot as plt

for p in prompts:  # compile: each prompt-length bucket has its own prefill
    for d in (draft, None):
        dj.generate(target, d, prompts=[p], max_new_tokens=MAX_NEW)
rows = []
for i, p in enumerate(prompts):
    s = dj.generate(target, draft, prompts=[p], max_new_tokens=MAX_NEW)
    b = dj.generate(target, None, prompts=[p], max_new_tokens=MAX_NEW)
    rows.append((i, b.new_tokens / b.seconds, s.new_tokens / s.seconds, s.tau))
print(f"{'prompt':>6} {'plain tok/s':>11} {'DSpark tok/s':>12} {'speedup':>7} {'tau':>5}")
for i, plain, spec, tau in rows:
    print(f"{i:>6} {plain:>11.1f} {spec:>12.1f} {spec / plain:>6.2f}x {tau:>5.2f}")
speedups = [spec / plain for _, plain, spec, _ in rows]
print(f"mean speedup {np.mean(speedups):.2f}x on {jax.devices()[0].device_kind}")
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(range(len(rows)), speedups)
ax.axhline(1.0, color="grey", lw=1)
ax.set_xlabel("prompt")
ax.set_ylabel("speedup over plain")
plt.show()
""",
    ),
    ("code", FOOTER),
]

# ------------------------------------------------------------------------------------------------ 03 train a draft

TRAIN = [
    (
        "md",
        header(
            "03_train_draft",
            "Training a DSpark draft",
            """
A short training run of a fresh DSpark draft against the embedded target, with the project's own training code
(`dspark_jax.train`, spec §9):

1. **data**: prompts are windows of Python standard-library files; the target writes the responses itself
   (`dspark_jax.regenerate`, spec §9.1), so the draft learns what this target would say;
2. **training**: a 1-layer draft with a Markov head and a confidence head, AdamW with warmup and cosine decay;
3. **loss curves** (total, CE, L1, confidence BCE) and the teacher-forced acceptance length τ from the training
   metrics, first update vs last;
4. **τ in real decoding**: the trained draft on held-out prompts, beside the draft that ships with the package
   (trained for 1000 updates on 0.59 M response tokens).

Real mode: ~800 updates, minutes on a Colab GPU/TPU (longer on a CPU). Smoke mode (`DSPARK_SMOKE=1`): 8 updates
on a handful of sequences; τ barely moves.
""",
        ),
    ),
    ("code", SETUP),
    ("md", "## Data: prompts from source files, responses from the target"),
    (
        "code",
        """
import json
import sysconfig
import tempfile
from importlib.resources import files

import matplotlib.pyplot as plt
import numpy as np

import dspark_jax as dj
from dspark_jax.regenerate import RegenArgs
from dspark_jax.regenerate import run as regenerate

PAIR = files("dspark_jax") / "assets" / "tiny_code"
TARGET = str(PAIR / "target")
target = dj.load_target(TARGET, dtype=DTYPE)
WORK = tempfile.mkdtemp(prefix="dspark_train_")

# Source files: a few packages of the running interpreter's standard library; one file is kept for evaluation.
stdlib = sysconfig.get_paths()["stdlib"]
packages = ["json"] if SMOKE else ["json", "email", "http", "logging", "asyncio", "importlib", "unittest", "xml"]
sources = sorted(p for pkg in packages for p in glob.glob(os.path.join(stdlib, pkg, "**", "*.py"), recursive=True))
heldout, train_files = sources[0], sources[1:]
with open(os.path.join(WORK, "sources.jsonl"), "w") as f:
    for path in train_files:
        with open(path, encoding="utf-8") as src:
            f.write(json.dumps({"ids": target.tokenizer.encode(src.read())}) + "\\n")

N_PROMPTS, RESPONSE = (8, 32) if SMOKE else (1024, 192)
start = time.perf_counter()
supervised = regenerate(
    RegenArgs(
        target=TARGET,
        data=os.path.join(WORK, "sources.jsonl"),
        out=os.path.join(WORK, "regen.jsonl"),
        num_prompts=N_PROMPTS,
        prompt_len=32 if SMOKE else 64,
        max_new_tokens=RESPONSE,
        batch_size=8 if SMOKE else 64,
        dtype=DTYPE,
    ),
    log=lambda line: None,
)
seconds = time.perf_counter() - start
print(f"{len(train_files)} source files -> {N_PROMPTS} prompts, {supervised} response tokens in {seconds:.0f} s")
""",
    ),
    (
        "md",
        "## Train a fresh draft\n\nThe draft's fields (spec §3) are merged over the target's config: hidden "
        "width, heads and vocabulary come from the target.",
    ),
    (
        "code",
        """
from dspark_jax.train import parse_config
from dspark_jax.train import run as train

fields = {
    "num_hidden_layers": 1,
    "block_size": 7,
    "target_layer_ids": [0, 2, 4],  # context features from these target layers (never the last one)
    "mask_token_id": 1,  # <|mask|> in the embedded tokenizer
    "num_anchors": 64,  # blocks drawn per sequence (spec §9.3)
    "markov_rank": 64,
    "markov_head_type": "vanilla",
    "enable_confidence_head": True,
    "confidence_head_with_markov": True,
}
with open(os.path.join(WORK, "draft_fields.json"), "w") as f:
    json.dump(fields, f)
RUN = os.path.join(WORK, "run")
STEPS = 8 if SMOKE else 800
flags = {
    "mode": "draft",
    "target": TARGET,
    "draft-config": os.path.join(WORK, "draft_fields.json"),
    "data": os.path.join(WORK, "regen.jsonl"),
    "output-dir": RUN,
    "seq-len": 64 if SMOKE else 256,
    "batch-size": 2 if SMOKE else 8,
    "max-steps": STEPS,
    "lr": 1e-3,
    "checkpoint-every": 1000000,
    "log-every": 1,
}
argv = [arg for name, value in flags.items() for arg in (f"--{name}", str(value))]
print("python -m dspark_jax.train " + " ".join(argv))
start = time.perf_counter()
summary = train(parse_config(argv + ["--no-progress"] if SMOKE else argv))
print(f"{summary['steps']} updates in {time.perf_counter() - start:.0f} s; final loss {summary['last']['loss']:.3f}")
print("exported draft:", sorted(f for f in os.listdir(RUN) if f.endswith((".json", ".safetensors"))))
""",
    ),
    (
        "md",
        "## Loss curves and teacher-forced τ\n\nτ here is spec §7.2's expected accepted length per block under "
        "teacher forcing, from the per-slot acceptance `α_j = 1 - ½‖p_j - π_j‖₁`.",
    ),
    (
        "code",
        """
with open(os.path.join(RUN, "metrics.jsonl")) as f:
    history = [json.loads(line) for line in f]
steps = [h["step"] for h in history]
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for key in ("loss", "loss_ce", "loss_l1", "loss_confidence"):
    axes[0].plot(steps, [h[key] for h in history], label=key)
axes[0].set_yscale("log")
axes[0].set_title("losses")
axes[0].legend()
axes[1].plot(steps, [h["tau"] for h in history])
axes[1].set_title("teacher-forced tau")
first, last = np.array(history[0]["accept_rate"]), np.array(history[-1]["accept_rate"])
axes[2].plot(first, "o--", label=f"update {history[0]['step']}")
axes[2].plot(last, "o-", label=f"update {history[-1]['step']}")
axes[2].set_title("teacher-forced acceptance per slot")
axes[2].set_ylim(0, 1)
axes[2].legend()
for ax in axes:
    ax.set_xlabel("update" if ax is not axes[2] else "slot j")
plt.show()
print(f"teacher-forced tau: {history[0]['tau']:.2f} after the first update -> {history[-1]['tau']:.2f} after the last")
""",
    ),
    (
        "md",
        "## τ in real decoding\n\nGreedy generation from windows of the held-out file; the shipped draft is the "
        "same architecture after 1000 updates on far more data.",
    ),
    (
        "code",
        """
with open(heldout, encoding="utf-8") as f:
    ids = target.tokenizer.encode(f.read())
rng = np.random.default_rng(0)
n_eval, prompt_len = (2, 32) if SMOKE else (16, 64)
starts = rng.integers(0, max(len(ids) - prompt_len, 1), n_eval)
eval_prompts = [ids[s : s + prompt_len] for s in starts]
MAX_NEW = 32 if SMOKE else 128
drafts = {"trained here": RUN, "shipped": str(PAIR / "dspark")}
for name, folder in drafts.items():
    d = dj.load_draft(folder, target=target)
    results = [dj.generate(target, d, prompts=[p], max_new_tokens=MAX_NEW) for p in eval_prompts]
    committed = [a for r in results for a in r.acceptance_lengths[0]]
    print(f"{name:>12}: tau {sum(committed) / len(committed):.2f} over {len(committed)} rounds")
print("(a draft that never helps has tau 1.00: one token per target pass, as plain decoding)")
""",
    ),
    ("code", FOOTER),
]

# -------------------------------------------------------------------------------------- 04 confidence, scheduling

CONFIDENCE = [
    (
        "md",
        header(
            "04_confidence_scheduling",
            "Confidence, calibration and the verify policies",
            """
The DSpark draft also predicts, for each drafted slot, the probability that it will be accepted (the confidence
head). With the embedded pair this notebook shows

* a **reliability diagram** of the prefix confidences `s_j = ∏_{i≤j} q_i` against how often slots 0..j were all
  accepted, before and after **sequential temperature scaling** (spec §10), with ECE / AUROC / Brier per slot
  (spec §7.3), fitted on one set of prompts and checked on another;
* the **measured cost table** the scheduler uses: seconds of a decoding round whose verification pass holds N
  tokens, timed on this device (spec §11);
* **τ and tokens/s per verify policy**: `full` (verify every draft), `threshold:X` (cut at the first slot whose
  confidence is below X) and `scheduler` (verify the prefix that maximises expected tokens per second), plus
  tree sizes once tree drafting is in the package.

Prompts are windows of held-out standard-library files (files the pair never trained on).
""",
        ),
    ),
    ("code", SETUP),
    (
        "code",
        """
import dataclasses
import sysconfig
from importlib.resources import files

import matplotlib.pyplot as plt
import numpy as np

import dspark_jax as dj
from dspark_jax.decoding.calibration import fit_temperatures
from dspark_jax.metrics import calibration_data, calibration_metrics, prefix_predictions, speculative_metrics
from dspark_jax.training.corpus import is_heldout, read_text, stdlib_files

PAIR = files("dspark_jax") / "assets" / "tiny_code"
target = dj.load_target(str(PAIR / "target"), dtype=DTYPE)
draft = dj.load_draft(str(PAIR / "dspark"), target=target)
B = draft.config.block_size

root = sysconfig.get_paths()["stdlib"]
heldout = [p for p in stdlib_files(root) if is_heldout(os.path.relpath(p, root))]
rng = np.random.default_rng(0)
PROMPT_LEN = 64
N_FIT, N_EVAL = (6, 3) if SMOKE else (48, 24)
MAX_NEW = 48 if SMOKE else 128
windows = []
for path in rng.permutation(heldout):
    ids = target.tokenizer.encode(read_text(path) or "")
    if len(ids) > PROMPT_LEN + 1:
        s = int(rng.integers(0, len(ids) - PROMPT_LEN))
        windows.append(ids[s : s + PROMPT_LEN])
    if len(windows) == N_FIT + N_EVAL:
        break
fit_prompts, eval_prompts = windows[:N_FIT], windows[N_FIT:]
print(f"{len(heldout)} held-out files; {len(fit_prompts)} prompts to fit, {len(eval_prompts)} to check")
""",
    ),
    (
        "md",
        "## Calibration data: full-block rounds\n\nOne prompt at a time (batch 1), so these calls also compile "
        "the loop the policy comparison below times.",
    ),
    (
        "code",
        """
def rounds(prompts, draft, verify="full"):
    \"\"\"Generate each prompt alone; returns the results.\"\"\"
    return [dj.generate(target, draft, prompts=[p], max_new_tokens=MAX_NEW, verify=verify) for p in prompts]


def as_calibration(results):
    conf = [c for r in results for c in r.confidence_logits]
    acc = [a for r in results for a in r.acceptance_lengths]
    prop = [p for r in results for p in r.proposal_lengths]
    return calibration_data(conf, acc, prop)


fit_data, eval_data = as_calibration(rounds(fit_prompts, draft)), as_calibration(rounds(eval_prompts, draft))
temps = fit_temperatures(*fit_data)
print(f"{fit_data[0].shape[0]} rounds to fit, {eval_data[0].shape[0]} to check")
print("fitted temperatures:", np.round(temps, 2))
if draft.calibration is not None:
    print("shipped calibration.json:", np.round(draft.calibration, 2))
""",
    ),
    (
        "code",
        """
def report(name, data, t=None):
    m = calibration_metrics(*data, temperatures=t)
    auc = [p["auroc"] for p in m["per_slot"]]
    auc = " ".join("  - " if a is None else f"{a:.2f}" for a in auc)
    print(f"{name:<22} ECE {m['summary']['ece']:.3f}  Brier {m['summary']['brier']:.3f}  AUROC/slot {auc}")
    return m


raw_fit, cal_fit = report("fit set, raw", fit_data), report("fit set, calibrated", fit_data, temps)
raw_eval, cal_eval = report("check set, raw", eval_data), report("check set, calibrated", eval_data, temps)


def reliability(ax, data, t, title):
    z, accepted, proposed = data
    for label, temps_ in (("raw", None), ("calibrated", t)):
        s = prefix_predictions(z, temps_)
        pred = np.concatenate([s[proposed > j, j] for j in range(B)])
        hit = np.concatenate([(accepted[proposed > j] > j).astype(float) for j in range(B)])
        idx = np.minimum((pred * 10).astype(int), 9)
        filled = [k for k in range(10) if np.any(idx == k)]
        ax.plot([pred[idx == k].mean() for k in filled], [hit[idx == k].mean() for k in filled], "o-", label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":")
    ax.set_xlabel("predicted P(slots 0..j accepted)")
    ax.set_title(title)
    ax.legend()


fig, axes = plt.subplots(1, 3, figsize=(15, 4))
reliability(axes[0], fit_data, temps, "reliability, fit set")
reliability(axes[1], eval_data, temps, "reliability, check set")
axes[0].set_ylabel("observed frequency")
slots = np.arange(B)
for m, style, name in ((raw_eval, "o--", "raw"), (cal_eval, "o-", "calibrated")):
    axes[2].plot(slots, [p["ece"] for p in m["per_slot"]], style, label=name)
axes[2].set_xlabel("slot j")
axes[2].set_title("ECE per slot, check set")
axes[2].legend()
plt.show()
""",
    ),
    (
        "md",
        "## The measured cost table\n\nThe scheduler's model of this device: the time of a decoding round at each "
        "target-pass width the loop compiles (width = the anchor + the drafts verified), and of a round without the "
        'draft. It is measured once per loop shape, by running that loop, at the first `verify="scheduler"` call; '
        "here we trigger it up front to show it.",
    ),
    (
        "code",
        """
from dspark_jax.decoding.loop import prepare, round_seconds_table

# The scheduler's draft: the temperatures fitted above.
calibrated = dataclasses.replace(draft, calibration=temps.astype(np.float32))
# prepare() validates a request and builds its loop; with verify="scheduler" it measures the table for that loop
# (same batch and cache buckets as the generate() calls below, so they reuse both the compilation and the table).
prep = prepare(target, calibrated, prompts=eval_prompts[:1], max_new_tokens=MAX_NEW, verify="scheduler")
width_seconds, plain_seconds = round_seconds_table(target, calibrated, prep)
print(f"round without the draft (plain step): {plain_seconds * 1e3:.2f} ms")
print(f"{'width':>5} {'drafts':>6} {'round ms':>9} {'x plain':>8} {'ms/token if all accepted':>25}")
for w, sec in zip(prep.spec.widths, width_seconds):
    print(f"{w:>5} {w - 1:>6} {sec * 1e3:>9.2f} {sec / plain_seconds:>8.2f} {sec / w * 1e3:>25.2f}")
""",
    ),
    (
        "md",
        "## τ and tokens/s per verify policy\n\nAll greedy, so every policy produces the same text; they "
        "differ in how many drafts each round sends to the target. The scheduler uses the temperatures fitted above.",
    ),
    (
        "code",
        """
POLICIES = ["full", "threshold:0.3", "threshold:0.6", "scheduler"]  # the thresholds share one compiled loop
rounds(eval_prompts[:1], None)  # compile plain decoding
runs = {"plain": rounds(eval_prompts, None)}
for policy in POLICIES:
    rounds(eval_prompts[:1], calibrated, policy)  # compile (and, for the scheduler, measure the cost table)
    runs[policy] = rounds(eval_prompts, calibrated, policy)
plain_tokens = [r.tokens for r in runs["plain"]]
plain_rate = sum(r.new_tokens for r in runs["plain"]) / sum(r.seconds for r in runs["plain"])
print(f"{'policy':<15} {'tau':>5} {'drafts/round':>12} {'tok/s':>8} {'vs plain':>8}")
summary = {}
for name, results in runs.items():
    seconds = sum(r.seconds for r in results)
    rate = sum(r.new_tokens for r in results) / seconds
    acc = [a for r in results for a in r.acceptance_lengths]
    prop = [p for r in results for p in r.proposal_lengths]
    m = speculative_metrics(acc, prop, B)
    summary[name] = (m["tau"], rate)
    assert [r.tokens for r in results] == plain_tokens, name  # lossless: greedy output never changes
    print(f"{name:<15} {m['tau']:>5.2f} {m['mean_proposal_length']:>12.2f} {rate:>8.1f} {rate / plain_rate:>7.2f}x")
""",
    ),
    (
        "code",
        """
names = list(summary)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
axes[0].bar(names, [summary[n][0] for n in names])
axes[0].set_title("tau (tokens per target pass)")
axes[1].bar(names, [summary[n][1] for n in names], color="tab:orange")
axes[1].set_title(f"tokens/s on {jax.devices()[0].device_kind}")
for ax in axes:
    ax.tick_params(axis="x", rotation=20)
plt.show()
""",
    ),
    (
        "md",
        "## Tree sizes\n\nTree drafting (several candidates per slot, verified in one pass) is planned; this "
        "cell runs when the installed package has it.",
    ),
    (
        "code",
        """
import inspect

if "tree" not in inspect.signature(dj.generate).parameters:
    print("skipped: this dspark_jax has no tree drafting yet (generate(..., tree=...))")
elif SMOKE:
    print("skipped in smoke mode: each tree size compiles its own loop (tests/test_tree_*.py cover trees)")
else:
    # "N,K,W": N nodes verified per round, K children per expanded node, W nodes expanded per level (trees.md §7).
    for tree in ("7,2,2", "15,4,4", "31,4,4"):
        dj.generate(target, calibrated, prompts=eval_prompts[:1], max_new_tokens=MAX_NEW, tree=tree)  # compile
        res = [dj.generate(target, calibrated, prompts=[p], max_new_tokens=MAX_NEW, tree=tree) for p in eval_prompts]
        rate = sum(r.new_tokens for r in res) / sum(r.seconds for r in res)
        committed = [a for r in res for row in r.acceptance_lengths for a in row]
        tau = sum(committed) / len(committed)
        print(f"tree {tree:>7}: tau {tau:.2f}, {rate:.1f} tok/s ({rate / plain_rate:.2f}x plain)")
""",
    ),
    ("code", FOOTER),
]

# ---------------------------------------------------------------------------------------------- 05 DeepSeek-V4 mesh

V4 = [
    (
        "md",
        header(
            "05_deepseek_v4_mesh",
            "DeepSeek-V4-Flash-DSpark on a TPU pod slice or a multi-GPU host",
            """
DeepSeek-V4-Flash-DSpark is the 284 B-parameter (13 B active) DeepSeek-V4-Flash mixture-of-experts target with a
3-stage DSpark draft stored in the same checkpoint (under `mtp.0..2`). It needs many accelerators, so this notebook

1. computes the **memory plan** from `config.json` alone: parameters and decoding caches per device for each
   (model × expert) split, and the smallest slice of each accelerator type that holds it;
2. builds the **mesh** on the attached devices (tensor parallelism over heads on `model`, the 256 routed experts
   on `expert`);
3. **converts** the FP8 / FP4 checkpoint into a sharded orbax checkpoint on that mesh (`conversion.convert
   --kind deepseek_v4`, one tensor at a time);
4. **generates**: plain decoding with the target, then speculative decoding with the draft stages.

Run it in a Jupyter kernel on a single host that sees all devices (e.g. 8 x H200, or a TPU VM whose slice is on
one host). On a multi-host pod slice, run the same code as a script on every host; the CLIs do this with
`--distributed auto` (interfaces.md §4), which calls `jax.distributed.initialize` first.

Smoke mode (`DSPARK_SMOKE=1`) sends a tiny random V4-DSpark-shaped checkpoint (a transformers
`DeepseekV4ForCausalLM` with random weights, plus random draft stages) through the same steps on a CPU; the plan
of the real model is computed in both modes.
""",
        ),
    ),
    ("code", SETUP),
    ("md", "## The released configuration and its memory plan"),
    (
        "code",
        """
import gzip
import json
import tempfile
from importlib.resources import files

import numpy as np

import dspark_jax as dj
from dspark_jax.memory_plan import GiB, device_memory, min_devices, v4_param_count, v4_plan
from dspark_jax.sharding import make_mesh

REPO_ID = "deepseek-ai/DeepSeek-V4-Flash-DSpark"
# The released config.json; the converter's key manifest carries a copy, so the plan needs no download.
manifest = files("conversion") / "manifests" / "deepseek-v4-flash-dspark.json.gz"
FLASH = json.loads(gzip.decompress(manifest.read_bytes()))["config"]
print(f"{REPO_ID}: {v4_param_count(FLASH) / 1e9:.0f} B params, {FLASH['num_hidden_layers']} layers")
print(f"{FLASH['n_routed_experts']} routed experts (top {FLASH['num_experts_per_tok']}) in every layer")
print(f"DSpark draft: block {FLASH['dspark_block_size']}, stages fed by layers {FLASH['dspark_target_layer_ids']}")

CONTEXT, BATCH = 65536, 8
print(f"\\nsmallest slice for batch {BATCH} x {CONTEXT} positions in bfloat16:")
print(f"{'device':<18} {'devices':>7} {'mesh':<28} {'GiB per device':>14}")
ACCELERATORS = {"TPU v5e": 16, "TPU v6e": 32, "H100": 80, "TPU v5p": 95, "H200": 141}  # GiB per device
for name, gib in ACCELERATORS.items():
    n, plan = min_devices(FLASH, int(gib * GiB), "bfloat16", CONTEXT, batch=BATCH)
    where = "-" if n is None else ",".join(f"{k}={v}" for k, v in plan.mesh.items())
    used = "-" if n is None else f"{plan.total_bytes / GiB:.1f}"
    print(f"{name + ', ' + str(gib) + ' GiB':<18} {n or '-':>7} {where:<28} {used:>14}")
""",
    ),
    (
        "code",
        """
import matplotlib.pyplot as plt

# Per-device bytes as the slice grows: experts spread over `expert`, heads and the MLP over `model` (up to 8 here).
counts = [2**i for i in range(3, 9)]
fig, ax = plt.subplots(figsize=(7, 3.5))
for context in (8192, CONTEXT, 262144):
    gib = []
    for n in counts:
        mesh_n = {"data": 1, "model": min(n, 8), "expert": n // min(n, 8)}
        gib.append(v4_plan(FLASH, mesh_n, "bfloat16", context=context, batch=BATCH, device_bytes=None).total_bytes)
    ax.plot(counts, np.array(gib) / GiB, "o-", label=f"batch {BATCH} x {context} positions")
for name, gib in ACCELERATORS.items():
    ax.axhline(gib * 0.9, color="grey", lw=0.8, ls=":")
    ax.text(counts[-1], gib * 0.9, f" {name}", va="center", fontsize=8)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("devices (model = 8, the rest on expert)")
ax.set_ylabel("GiB per device")
ax.set_title("DeepSeek-V4-Flash-DSpark, bfloat16")
ax.legend(fontsize=8)
plt.show()
""",
    ),
    (
        "md",
        "## The checkpoint to run\n\nReal mode: the hub checkpoint (about 160 GB of FP8 / FP4 safetensors). "
        "Smoke mode: a tiny random model with every V4 layer type (sliding window, compressed sparse and heavily "
        "compressed attention, hash and top-k routing) written with transformers, plus random draft stages.",
    ),
    (
        "code",
        """
WORK = tempfile.mkdtemp(prefix="dspark_v4_") if SMOKE else os.path.abspath("dspark_v4")
if SMOKE:
    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    # The released config scaled down, keeping every layer type (compress ratio 0: sliding window only, 4:
    # compressed sparse, 128: heavily compressed; the 3 trailing zeros are the draft stages), hash routing in layer 0.
    dropped = ("quantization_config", "expert_dtype", "num_nextn_predict_layers")  # the tiny model is unquantised
    TINY = {k: v for k, v in FLASH.items() if k not in dropped}
    TINY.update(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32)
    TINY.update(qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8)
    TINY.update(compress_ratios=[0, 4, 128, 0, 0, 0, 0], num_hash_layers=1, moe_intermediate_size=32)
    TINY.update(index_n_heads=4, index_head_dim=16, index_topk=8, n_routed_experts=8, num_experts_per_tok=2)
    TINY.update(dspark_target_layer_ids=[1, 2, 3], dspark_noise_token_id=255, dspark_markov_rank=16)
    torch.manual_seed(0)
    hf = os.path.join(WORK, "tiny_v4_transformers")
    fields = {k: v for k, v in TINY.items() if k not in ("architectures", "model_type")}
    transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**fields)).save_pretrained(hf)

    # The -DSpark layout (V4 §3.1, §4.2): the target's tensors under their native names, plus draft stages mtp.0..2,
    # each shaped like the last (sliding-window) target layer. transformers writes no mtp.*, so they are random here.
    tensors = {}
    for key, value in load_file(os.path.join(hf, "model.safetensors")).items():
        key = key.removeprefix("model.").replace("embed_tokens.", "embed.").replace("hc_head.hc_", "hc_head_")
        tensors[key.replace(".attn.norm.", ".attn.kv_norm.")] = value
    rng = np.random.default_rng(0)

    def rand(shape, scale):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    H, V, R, S = 64, 256, 16, len(TINY["dspark_target_layer_ids"])
    layer = f"layers.{TINY['num_hidden_layers'] - 1}."
    for s in range(S):
        for key, value in [kv for kv in tensors.items() if kv[0].startswith(layer)]:
            tensors[f"mtp.{s}." + key.removeprefix(layer)] = value + rand(value.shape, 0.02)
    last = f"mtp.{S - 1}."
    tensors["mtp.0.main_proj.weight"] = rand((H, S * H), (S * H) ** -0.5)
    tensors["mtp.0.main_norm.weight"] = 1 + rand((H,), 0.2)
    tensors[last + "norm.weight"] = 1 + rand((H,), 0.2)
    tensors[last + "hc_head_fn"] = rand((4, 4 * H), (4 * H) ** -0.5)
    tensors[last + "hc_head_base"] = rand((4,), 0.5)
    tensors[last + "hc_head_scale"] = rand((1,), 0.5)
    tensors[last + "markov_head.markov_w1.weight"] = rand((V, R), 1.0)
    tensors[last + "markov_head.markov_w2.weight"] = rand((V, R), 0.25)
    tensors[last + "confidence_head.proj.weight"] = rand((1, H + R), 0.125)
    SRC = os.path.join(WORK, "tiny_v4_dspark")
    os.makedirs(SRC)
    save_file(tensors, os.path.join(SRC, "model.safetensors"))
    with open(os.path.join(SRC, "config.json"), "w") as f:
        json.dump(TINY, f)
else:
    from dspark_jax.loading import resolve

    SRC = resolve(REPO_ID)  # safetensors and JSON only
with open(os.path.join(SRC, "config.json")) as f:
    config = json.load(f)
print(f"{SRC}: {v4_param_count(config) / 1e6:,.2f} M params")
""",
    ),
    (
        "md",
        "## The mesh on this host\n\nThe planner's smallest split that fits the attached devices' memory; a host "
        "with more devices than that leaves the rest idle (raise `expert` to use them).",
    ),
    (
        "code",
        """
RUN_CONTEXT, RUN_BATCH = (512, 1) if SMOKE else (32768, 8)
memory = device_memory()
n_needed, plan = min_devices(config, memory, DTYPE, RUN_CONTEXT, batch=RUN_BATCH, limit=jax.device_count())
if n_needed is None:
    all_experts = {"data": 1, "model": 1, "expert": jax.device_count()}
    plan = v4_plan(config, all_experts, DTYPE, context=RUN_CONTEXT, batch=RUN_BATCH)
    raise SystemExit(f"{jax.device_count()} x {memory / GiB:.0f} GiB is not enough: {plan.describe()}")
MESH = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
mesh = make_mesh(MESH)
print(plan.describe())
print(f"mesh {dict(mesh.shape)}: {n_needed} of {jax.device_count()} device(s)")
""",
    ),
    (
        "md",
        "## Convert to a sharded orbax checkpoint\n\nSame as `python -m conversion.convert --src ... --dst ... "
        "--kind deepseek_v4 --mesh ...` in a shell; here in the kernel, which already holds the accelerators.",
    ),
    (
        "code",
        """
from conversion.convert import main as convert

DST = os.path.join(WORK, "v4_orbax")
argv = ["--src", SRC, "--dst", DST, "--kind", "deepseek_v4", "--dtype", DTYPE, "--mesh", MESH]
if os.path.isdir(DST):
    print(f"{DST} exists, kept")
else:
    start = time.perf_counter()
    print("python -m conversion.convert " + " ".join(argv))
    assert convert(argv) == 0
    print(f"converted in {time.perf_counter() - start:.0f} s")
""",
    ),
    ("md", "## Load sharded and generate"),
    (
        "code",
        """
start = time.perf_counter()
target = dj.load_target(DST, dtype=DTYPE, mesh=mesh)
print(f"loaded in {time.perf_counter() - start:.0f} s")
if target.tokenizer is not None:
    prompts = [target.tokenizer.encode_prompt("Write a haiku about mixture-of-experts models.")]
else:  # the tiny random model has no tokenizer
    prompts = [np.random.default_rng(0).integers(2, config["vocab_size"], 24).tolist()]
MAX_NEW = 16 if SMOKE else 256
dj.generate(target, None, prompts=prompts, max_new_tokens=MAX_NEW)  # compile
plain = dj.generate(target, None, prompts=prompts, max_new_tokens=MAX_NEW)
print(target.tokenizer.decode(plain.tokens[0]) if target.tokenizer else plain.tokens[0])
print(f"plain decoding: {plain.new_tokens / plain.seconds:.1f} tok/s")
""",
    ),
    (
        "md",
        "## Speculative decoding with the DSpark stages\n\nThe draft is read from the -DSpark safetensors folder "
        "itself (the orbax checkpoint holds the target only) and placed on the target's mesh.",
    ),
    (
        "code",
        """
start = time.perf_counter()
draft = dj.load_draft(SRC, target=target)  # mtp.* of the -DSpark folder, placed on the target's mesh
seconds = time.perf_counter() - start
print(f"draft: {draft.config.num_stages} stages, block {draft.config.block_size}, loaded in {seconds:.0f} s")
dj.generate(target, draft, prompts=prompts, max_new_tokens=MAX_NEW)  # compile
spec = dj.generate(target, draft, prompts=prompts, max_new_tokens=MAX_NEW)
assert spec.tokens == plain.tokens  # greedy speculative decoding reproduces plain decoding
rate, plain_rate = spec.new_tokens / spec.seconds, plain.new_tokens / plain.seconds
print(f"DSpark: tau {spec.tau:.2f}, {rate:.1f} tok/s, {rate / plain_rate:.2f}x plain")
if SMOKE:
    print("(random draft stages: tau near 1 is expected)")
""",
    ),
    ("code", FOOTER),
]

NOTEBOOKS = {
    "01_quickstart": QUICKSTART,
    "02_real_checkpoints": REAL,
    "03_train_draft": TRAIN,
    "04_confidence_scheduling": CONFIDENCE,
    "05_deepseek_v4_mesh": V4,
}


def render(name: str) -> str:
    """The notebook `name` as .ipynb JSON text, without outputs; cell ids are fixed so rebuilds are stable."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    for i, (kind, source) in enumerate(NOTEBOOKS[name]):
        make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        cell = make(source.strip("\n"))
        cell["id"] = f"cell-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in NOTEBOOKS:
        path = os.path.join(HERE, name + ".ipynb")
        text = render(name)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            stale.append(path)
            if not check:
                with open(path, "w") as f:
                    f.write(text)
    if check and stale:
        print("out of date (run python notebooks/build.py): " + ", ".join(stale))
        return 1
    print(("checked " if check else "wrote ") + ", ".join(n + ".ipynb" for n in NOTEBOOKS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
