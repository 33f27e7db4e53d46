# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sparse-attn/sparse-attn/blob/main/colab/03_flax_integration.ipynb)
#
# # 03 · Sparse decoding in Flax NNX: your own module, then a Hugging Face checkpoint
#
# A `sparse_attn` estimator is a triple of pure functions, so it drops into any decoder:
#
# 1. put an estimator into **your own** Flax NNX attention module (KV cache and index as
#    module state, one jitted decode step);
# 2. load a Hugging Face checkpoint with `models.load_hf`, generate with sparse decode
#    attention and compare with dense, token by token and logit by logit.
#
# It runs on a CPU in under 3 minutes (`SPARSE_ATTN_SMALL=1` shrinks it for CI).

# %%
# Colab only: clone the repository (the notebooks read its reference model, fixtures and
# benchmarks) and install it. Elsewhere this does nothing: run from a checkout after
# `pip install -e ".[test]"`.
import os
import sys

if "google.colab" in sys.modules:
  REPO_DIR = "/content/sparse-attn"  # a rerun keeps the clone (git refuses to clone again)
  os.system(f"git clone -q --depth 1 https://github.com/sparse-attn/sparse-attn {REPO_DIR}")
  os.system(f"{sys.executable} -m pip install -q -e '{REPO_DIR}[plot]'")
  sys.path.insert(0, REPO_DIR)

# %%
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import models
import sparse_attn as sa

START = time.perf_counter()
SMALL = os.environ.get("SPARSE_ATTN_SMALL", "") not in ("", "0")  # CI: smaller sizes
REPO = pathlib.Path(models.__file__).resolve().parents[1]  # the checkout (or Colab clone)
print(f"jax {jax.__version__} on {jax.devices()[0].platform}")

# %% [markdown]
# ## 1. An estimator in your own NNX attention module
#
# What a decode step needs from an estimator (`est = sa.magicpig(...)`, `sa.topk(...)`, ...):
#
# * at prefill, `index = est.init(cache, key)`: build its state (hash tables, codes, ...) over
#   the prompt's keys;
# * each step, after writing the new token's key and value into the cache and incrementing
#   `cache.length`: `index = est.append(index, cache)` (hashes only the new token), then
#   `res = est.attend(q, cache, index, key)` with `q [B, Hq, D]`; `res.out [B, Hq, D]` replaces
#   the attention output.
#
# The cache is `sa.KVCache(keys, values, length)`, `keys, values [B, Hkv, S, D]` with a static
# capacity `S` and `length int32 [B]`; keys are stored *after* RoPE (the estimators compare
# the query with keys as attention sees them). Below, a grouped-query attention layer keeps
# the cache and the index as NNX state (a `Variable` subclass, so they are neither parameters
# nor hidden globals; `get_value()` / `set_value()` read and write them), and holds the
# estimator as a static attribute: `nnx.jit` compiles one decode step per estimator. RoPE
# is left out to keep it short; apply it to `q` and `k` in `project` if your model has it.

# %%
class DecodeCache(nnx.Variable):
  """Decode state: the KV cache and the estimator's index (not trained, not a parameter)."""


class SparseAttention(nnx.Module):
  """Grouped-query attention whose decode step goes through a `sparse_attn` estimator."""

  def __init__(self, d_model, num_heads, num_kv_heads, head_dim, *, capacity, batch,
               estimator=None, rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.q_proj = nnx.Linear(d_model, num_heads * head_dim, use_bias=False, rngs=rngs)
    self.k_proj = nnx.Linear(d_model, num_kv_heads * head_dim, use_bias=False, rngs=rngs)
    self.v_proj = nnx.Linear(d_model, num_kv_heads * head_dim, use_bias=False, rngs=rngs)
    self.o_proj = nnx.Linear(num_heads * head_dim, d_model, use_bias=False, rngs=rngs)
    self.estimator = estimator or sa.dense()  # static: part of the graph definition
    shape = (batch, num_kv_heads, capacity, head_dim)
    self.cache = DecodeCache(sa.KVCache(jnp.zeros(shape), jnp.zeros(shape),
                                        jnp.zeros((batch,), jnp.int32)))
    self.index = DecodeCache(())

  def project(self, x):  # x [B, T, d_model] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]
    def split(y, heads):
      return y.reshape(*x.shape[:2], heads, self.head_dim).transpose(0, 2, 1, 3)

    return (split(self.q_proj(x), self.num_heads), split(self.k_proj(x), self.num_kv_heads),
            split(self.v_proj(x), self.num_kv_heads))

  def prefill(self, x, key):
    """Dense causal attention over the prompt x [B, T, d]; fills the cache, builds the index."""
    q, k, v = self.project(x)
    T = x.shape[1]
    group = self.num_heads // self.num_kv_heads
    scores = jnp.einsum("bhgtd,bhsd->bhgts", q.reshape(q.shape[0], self.num_kv_heads, group,
                                                        T, -1), k) / math.sqrt(self.head_dim)
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
    out = jnp.einsum("bhgts,bhsd->bhgtd", jax.nn.softmax(scores, -1), v)
    keys, values, _ = self.cache.get_value()
    cache = sa.KVCache(keys.at[:, :, :T].set(k), values.at[:, :, :T].set(v),
                       jnp.full((x.shape[0],), T, jnp.int32))
    self.cache.set_value(cache)
    self.index.set_value(self.estimator.init(cache, key))
    return self.o_proj(out.reshape(q.shape).transpose(0, 2, 1, 3).reshape(*x.shape[:2], -1))

  def __call__(self, x, key):
    """One decode step: x [B, d_model] (the new token) -> [B, d_model]."""
    q, k, v = (y[:, :, 0] for y in self.project(x[:, None]))  # [B, H, D]
    keys, values, length = self.cache.get_value()
    rows = jnp.arange(x.shape[0])
    cache = sa.KVCache(keys.at[rows, :, length].set(k), values.at[rows, :, length].set(v),
                       length + 1)
    index = self.estimator.append(self.index.get_value(), cache)
    res = self.estimator.attend(q, cache, index, key)
    self.cache.set_value(cache)
    self.index.set_value(index)
    return self.o_proj(res.out.reshape(x.shape[0], -1)), res.density


# %% [markdown]
# Two copies of the layer with the same weights, one dense and one MagicPIG; prefill both
# with the same prompt, then decode the same inputs. The weights are random and the inputs
# are random vectors with a shared component (so that attention is not uniform): the point
# is the wiring, and the error it reports. `nnx.jit` traces the module's state in and out,
# so the step updates the cache and index in place of the module's attributes.

# %%
T = 1024 if SMALL else 4096
STEPS = 8 if SMALL else 32
B, d_model = 2, 128
make = lambda est: SparseAttention(d_model, 4, 2, 32, capacity=T + STEPS, batch=B,  # noqa: E731
                                   estimator=est, rngs=nnx.Rngs(0))
dense_layer = make(None)
sparse_layer = make(sa.magicpig(K=8, L=60, max_selected=0.3, max_candidates=1.0))
nnx.update(sparse_layer, nnx.state(dense_layer, nnx.Param))  # same weights (here already)

kx, kd = jax.random.split(jax.random.PRNGKey(0))
xs = jax.random.normal(kx, (B, T + STEPS, d_model)) + 2.0 * jax.random.normal(kd, (d_model,))


@nnx.jit
def prefill(layer, x, key):
  return layer.prefill(x, key)


@nnx.jit
def step(layer, x, key):
  return layer(x, key)


key = jax.random.PRNGKey(1)
prefill(dense_layer, xs[:, :T], key)
prefill(sparse_layer, xs[:, :T], key)
errors, densities = [], []
for t in range(T, T + STEPS):
  out_d, _ = step(dense_layer, xs[:, t], key)
  out_s, dens = step(sparse_layer, xs[:, t], key)
  errors.append(float(jnp.max(jnp.linalg.norm(out_s - out_d, axis=-1)
                              / jnp.linalg.norm(out_d, axis=-1))))
  densities.append(float(dens.mean()))
print("cache length now", sparse_layer.cache.get_value().length, "; index:",
      type(sparse_layer.index.get_value()).__name__)
print(f"MagicPIG layer vs dense over {STEPS} steps: worst relative error per step "
      f"{min(errors):.3f}-{max(errors):.3f}, density {np.mean(densities):.3f}")

# %% [markdown]
# Anything with the `(init, append, attend)` shape works here: `sa.dense()`,
# `sa.streaming(sinks, local)`, `sa.topk(k or fraction, predictor=...)`, `sa.uniform(rate)`,
# `sa.vattention(epsilon, delta)`, `sa.magicpig(K, L)`, `sa.spotlight(hash_params)`
# (notebook 04 trains the parameters). `attend` takes a PRNG key; only the sampling
# estimators (uniform, vAttention) use it. MagicPIG's `append` donates the index it is given
# (updated in place): keep only the returned one, as the layer does.
#
# ## 2. A Hugging Face checkpoint: `models.load_hf`, `models.generate`
#
# `models.load_hf(folder)` builds a Flax NNX decoder from a Hugging Face checkpoint folder
# (`config.json` and `*.safetensors`; Llama 3.x, Mistral, Qwen2, Qwen3) and returns
# `(model, config)`; a hub id such as `"meta-llama/Llama-3.1-8B"` also works where
# `huggingface_hub` is installed and the network is reachable. Here: the repository's test
# fixture `tests/fixtures/llama3`, a 2-layer Llama 3 with random weights (head dim 16, 4 query
# and 2 KV heads, a 128-token vocabulary) whose logits match `transformers`'.

# %%
model, config = models.load_hf(REPO / "tests" / "fixtures" / "llama3")
print(config)
P = 384 if SMALL else 1024
rng = np.random.default_rng(0)
prompts = rng.integers(0, config.vocab_size, (2, P)).astype(np.int32)
lengths = np.array([P, P - 100], np.int32)  # ragged: the second prompt is right-padded
logits = model(jnp.asarray(prompts[:1, :16]))  # the full causal forward
print("forward logits", logits.shape)

# %% [markdown]
# `models.generate(model, prompt_ids, max_new_tokens, attention=..., dense_layers=...,
# key=..., temperature=0.0, prompt_lengths=...)`: a dense causal prefill, then one jitted
# decode step per token in which every layer not in `dense_layers` writes its cache, calls
# `est.append` and `est.attend`. `attention` is one estimator for every layer or a list with
# one per layer (`None` = dense). Greedy by default; `key` is required when an estimator
# samples or `temperature > 0`. It returns `tokens [B, max_new_tokens]` and `density
# [max_new_tokens - 1, layers, B, Hq]`.

# %%
NEW = 16 if SMALL else 48
key = jax.random.key(0)
magicpig = sa.magicpig(K=8, L=60, max_selected=0.3, max_candidates=1.0)
dense_out = models.generate(model, prompts, NEW, prompt_lengths=lengths)
sparse_out = models.generate(model, prompts, NEW, attention=magicpig, dense_layers=(0,),
                             key=key, prompt_lengths=lengths)
agree = np.asarray(dense_out.tokens == sparse_out.tokens).mean(1)
print("dense  ", np.asarray(dense_out.tokens[0, :16]))
print("sparse ", np.asarray(sparse_out.tokens[0, :16]))
print("tokens equal to dense, per prompt:", agree,
      "; layer 1 density", float(sparse_out.density[:, 1].mean()))

# %% [markdown]
# Greedy tokens are a blunt comparison: after the first difference the two continuations
# diverge. A sharper one feeds *the same* tokens to both (teacher forcing) and compares the
# logits at every step. `models.prefill(model, ids, lengths, capacity=, attention=,
# dense_layers=, key=)` returns the last prompt token's logits and a `DecodeState` (one
# `KVCache` and one index per layer); `models.decode_step(model, state, tokens, attention=,
# dense_layers=, key=)` feeds one token per row and returns `(logits, state, density)`. The
# state is donated (updated in place): use the returned one.

# %%
methods = {
    "magicpig K=8 L=60": magicpig,
    "oracle top-k 5%": sa.topk(fraction=0.05),
    "streaming 4+64": sa.streaming(4, 64),
}
if not SMALL:
  methods["vattention eps=0.1"] = sa.vattention(0.1, 0.05, guarantee="output")
forced = np.asarray(dense_out.tokens)  # the dense continuation, fed to every method
capacity = P + NEW


def logit_errors(attention):
  kw = dict(attention=attention, dense_layers=(0,) if attention else (), key=key)
  ref_logits, state = models.prefill(model, prompts, lengths, capacity=capacity, **kw)
  out = []
  for t in range(NEW):
    logits, state, _ = models.decode_step(model, state, forced[:, t], **kw)
    out.append(np.asarray(logits))
  return np.stack(out)  # [NEW, B, V]


dense_logits = logit_errors(None)
fig, ax = plt.subplots(figsize=(6, 3.8))
for name, est in methods.items():
  lg = logit_errors(est)
  err = np.abs(lg - dense_logits).max(-1) / np.abs(dense_logits).max(-1)  # [NEW, B]
  ax.plot(err.mean(1), label=name)
  print(f"{name:>20}: max |logit - dense| / max |dense logit| = {err.mean():.4f} (mean over "
        f"steps), argmax equal {np.mean(lg.argmax(-1) == dense_logits.argmax(-1)):.2f}")
ax.set(yscale="log", xlabel="decode step", ylabel="relative logit error (layer 1 sparse)",
       title=f"teacher-forced decode, prompt {P} tokens")
ax.legend()
fig.tight_layout()
fig.savefig("logit_error.png", dpi=100)
plt.show()

# %% [markdown]
# On a trained model these errors are what decides whether a method is usable; on the
# fixture's random weights (nearly flat attention, head dim 16) they show the plumbing, not
# the methods' quality: expect large errors from every method here. To use a real
# checkpoint, pass its folder (or hub id) to `models.load_hf` and a matching tokenizer's
# ids as `prompt_ids`. The decoder also provides `models.capture(model, ids)`, the per-layer
# post-RoPE queries, keys and values of a prefill: notebook 01 studies attention with it,
# notebook 04 trains Spotlight's hash heads on it. The MagicPIG paper keeps some layers dense
# (e.g. 0 and 16 of 32): that is `dense_layers`.

# %%
print(f"notebook ran in {time.perf_counter() - START:.0f} s")
