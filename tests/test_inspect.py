"""Hook points (llamanp.inspect) against independent references.

- hidden states and attention patterns against transformers'
  output_hidden_states / eager output_attentions (tiny models and SmolLM2);
- the values seen at each position are the same whatever the KV-cache
  strategy and however the prompt is split, and hooks hold through generation;
- a replacement returned by a hook changes the logits exactly as the same
  change made by hand in a plain float64 forward pass written here;
- bad hooks fail with one clear error naming the hook point;
- the command-line logit lens and pictures, and docs/inspect.md's examples.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import refmodels as R
import torch
from conftest import REPO, case, run_cli

import llamanp
from llamanp.inspect import (
    ATTENTION_POINTS,
    HookError,
    Recorder,
    hook_names,
    logit_lens,
    read_cache,
)
from llamanp.kvcache import STRATEGIES

HIDDEN_RTOL = 1e-4     # max |diff| / max |reference|, per hidden state
PATTERN_TOL = 1e-5     # max |diff| of attention weights

# one converted through convert.py (the converter's q/k permutation), two
# written directly from the format spec (MQA with odd heads, wide heads)
CASES = [case("hf-gqa4_2", "gqa4_2", "hf", legacy_config=True),
         case("lmw-mqa3_1_tied_eps6", "mqa3_1_tied_eps6", "lmw"),
         case("lmw-gqa4_2_hd24", "gqa4_2_hd24", "lmw")]


@pytest.fixture(scope="module", autouse=True)
def _start_conversions(store):
    store.prefetch(CASES)


def rel_diff(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


@torch.no_grad()
def hf_inside(model, ids):
    """transformers' hidden states and eager attention weights, as numpy."""
    was = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=torch.tensor([list(ids)]), output_hidden_states=True,
                    output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(was)
    # transformers' last hidden state is the final norm's output: check it is
    hidden = [h[0].numpy() for h in out.hidden_states]
    assert np.allclose(model.lm_head(out.hidden_states[-1])[0].numpy(), out.logits[0].numpy(),
                       atol=1e-5)
    return hidden, [a[0].numpy() for a in out.attentions], out.logits[0].numpy()


def check_against_hf(model, ids, hf_model):
    hidden, attentions, logits = hf_inside(hf_model, ids)
    n = model.config.n_layers
    got_logits, acts = model.run_with_cache(
        ids, lambda name: name in ("embed", "final_norm") or name.endswith((".resid_post",
                                                                             ".pattern")))
    assert rel_diff(acts["embed"], hidden[0]) <= HIDDEN_RTOL
    for i in range(n - 1):
        assert rel_diff(acts[f"blocks.{i}.resid_post"], hidden[i + 1]) <= HIDDEN_RTOL, i
    assert rel_diff(acts["final_norm"], hidden[n]) <= HIDDEN_RTOL
    for i in range(n):
        diff = float(np.abs(acts[f"blocks.{i}.pattern"] - attentions[i]).max())
        assert diff <= PATTERN_TOL, f"layer {i}: max |pattern diff| {diff:.3g}"
    return got_logits, logits


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_hidden_states_and_patterns_equal_transformers(store, c):
    ref = store.reference(c.spec)
    got, want = check_against_hf(store.load(c), ref.ids, ref.model)
    assert float(np.abs(got - want).max()) <= 1e-4


def test_smollm2_hidden_states_and_patterns_equal_transformers(smollm2_gguf, smollm2_lmw):
    from test_gguf import SMOL_PROMPTS, transformers_from_gguf
    check_against_hf(llamanp.load(smollm2_lmw), SMOL_PROMPTS["capital"],
                     transformers_from_gguf(smollm2_gguf))


# ---------------------------------------------------------------------------
# the same values whatever the cache and however the prompt is fed
# ---------------------------------------------------------------------------

PARTS = [5, 1, 4, 2]     # the prompt (12 tokens) fed in these pieces
EXACT = [name for name, cls in STRATEGIES.items() if cls.exact]   # none, inplace, concat, ...


def expected_slice(full, name, first, rows, seen):
    """The full pass's value of `name` for `rows` rows from position `first`,
    seeing `seen` keys."""
    if name.endswith(ATTENTION_POINTS[:2]):       # scores, pattern: [heads, T, seen]
        return full[:, first:first + rows, :seen]
    return full[first:first + rows]


def test_every_exact_strategy_is_covered():
    assert {"none", "inplace", "concat"} <= set(EXACT)


@pytest.mark.parametrize("kvcache", EXACT)
def test_values_equal_one_full_pass_for_every_cache_and_split(store, kvcache):
    c = CASES[1]
    model, ids = store.load(c), store.reference(c.spec).ids
    assert sum(PARTS) == len(ids)
    _, full = model.run_with_cache(ids)
    rec = Recorder()
    session = model.session(kvcache, hooks=[(lambda name: True, rec)])
    fed = 0
    for n in PARTS:
        session.feed(ids[fed:fed + n], all_logits=True)
        fed += n
        for name in hook_names(model.config):
            # "none" recomputes every position so far; the logits are only the new ones'
            first = 0 if kvcache == "none" and name not in ("final_norm", "logits") else fed - n
            got = rec.values[name][-1]
            want = expected_slice(full[name], name, first, fed - first, fed)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
    if kvcache != "none":
        held = read_cache(session)
        for i, (keys, values) in enumerate(held):
            np.testing.assert_allclose(keys, full[f"blocks.{i}.k"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(values, full[f"blocks.{i}.v"], rtol=1e-4, atol=1e-5)
    else:
        assert all(k.shape[0] == 0 for k, _ in read_cache(session))


def steer_hook(vector):
    def add(x, name):
        return x + vector
    return add


def test_hooks_hold_through_generation_with_every_cache(store):
    """Greedy generation with a hook gives, with every cache strategy, the
    tokens that recomputing the whole sequence with the hook picks."""
    c = CASES[0]
    model, ids = store.load(c), store.reference(c.spec).ids[:6]
    vector = np.random.default_rng(1).standard_normal(model.config.dim).astype(np.float32)
    hooks = [("blocks.0.resid_post", steer_hook(vector))]
    want = []
    for _ in range(8):
        want.append(int(model.run_with_hooks(ids + want, hooks)[-1].argmax()))
    plain = list(llamanp.generate(model, ids, 8, stop_ids=()))
    assert plain != want                  # the hook really steers
    for kvcache in EXACT:
        got = list(llamanp.generate(model, ids, 8, stop_ids=(), kvcache=kvcache, hooks=hooks))
        assert got == want, kvcache


SMALL = {"window": "window:size=8", "sinks": "sinks:size=8,sinks=2", "h2o": "h2o:size=8",
         "tova": "tova:size=8", "knorm": "knorm:size=8", "random": "random:size=8",
         "snapkv": "snapkv:size=8,window=4", "kivi": "kivi:residual=4,group=16",
         "paged": "paged:block=4"}


@pytest.mark.parametrize("name", sorted(STRATEGIES) + ["inplace:dtype=f16"])
def test_attention_hooks_work_with_every_cache(store, name):
    """With a hook on the attention's insides (the plain attention runs), a
    generation through any strategy (small budgets, so the lossy ones evict
    or quantize, and the ones that read the weights get them) picks the same
    tokens as without hooks, and read_cache reads the cache."""
    c = CASES[0]
    model, ids = store.load(c), store.reference(c.spec).ids
    spec = SMALL.get(name, name)
    seen = []
    hooks = [("blocks.1.pattern", lambda p, n: seen.append(p.shape))]
    plain = list(llamanp.generate(model, ids, 10, stop_ids=(), kvcache=spec))
    gen = llamanp.generate(model, ids, 10, stop_ids=(), kvcache=spec, hooks=hooks)
    assert list(gen) == plain
    assert len(seen) == 10 and all(s[0] == model.config.n_heads for s in seen)
    held = read_cache(gen.session)
    assert len(held) == model.config.n_layers
    assert held[0][0].shape[1:] == (model.config.n_kv_heads, model.config.head_dim)


def test_chat_console_api_takes_hooks(lens_model):
    """Chat(..., hooks=) runs them in every forward pass of every turn: each
    step's logits are those of the whole context run with the hooks."""
    from llamanp.console import Chat
    model = llamanp.load(lens_model)
    vector = np.random.default_rng(2).standard_normal(model.config.dim).astype(np.float32)
    hooks = [("blocks.0.resid_post", steer_hook(vector))]
    seen = []

    def greedy(logits, history):
        seen.append((np.array(logits), list(history)))
        return int(np.argmax(logits))
    chat = Chat(model, template="llama2", hooks=hooks)
    for text in ("the little cat", "and the dog?"):
        chat.respond(text, greedy, max_new_tokens=3)
    assert len(seen) >= 4
    for logits, history in seen:
        np.testing.assert_allclose(logits, model.run_with_hooks(history, hooks)[-1], atol=1e-4)
    assert np.abs(seen[0][0] - model.logits(seen[0][1])[-1]).max() > 0.1


# ---------------------------------------------------------------------------
# interventions against a float64 reference forward pass
# ---------------------------------------------------------------------------

def zero_head_hook(head):
    def hook(z, name):
        out = z.copy()
        out[:, head] = 0
        return out
    return hook


@pytest.mark.parametrize("change", ["zero_head", "add_vector"])
def test_a_replacement_changes_the_output_as_the_same_change_by_hand(store, change):
    c = CASES[0]
    ref = store.reference(c.spec)
    model, spec, ids = store.load(c), ref.spec, ref.ids
    sd = R.meta_state_dict(ref.model)
    if change == "zero_head":
        by_hand = dict(zero_head=(1, 2))
        hooks = [("blocks.1.z", zero_head_hook(2))]
    else:
        vector = np.random.default_rng(0).standard_normal(spec.dim)
        by_hand = dict(add=(0, vector))
        hooks = [("blocks.0.resid_post", steer_hook(vector.astype(np.float32)))]
    want = R.meta_forward(sd, spec, ids, **by_hand)      # float64, by hand
    plain = R.meta_forward(sd, spec, ids)
    assert np.abs(want - plain).max() > 0.1          # the change matters
    np.testing.assert_allclose(plain, ref.logits, atol=1e-4)
    got = model.run_with_hooks(ids, hooks)
    assert float(np.abs(got - want).max()) <= 1e-4


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(store):
    c = CASES[1]
    return store.load(c), store.reference(c.spec).ids


@pytest.mark.parametrize("hooks,message", [
    ([("blocks.0.atn_out", print)], "unknown hook point 'blocks.0.atn_out'; did you mean "
                                    "'blocks.0.attn_out'?"),
    ([("blocks.1.resid_psot", print)], "did you mean 'blocks.1.resid_post'?"),
    ([("final_nrom", print)], "did you mean 'final_norm'?"),
    ([("blocks.7.q", print)], "the model has 2 layers (blocks.0 .. blocks.1)"),
    ([("blocks.0.q", "not a function")], "the hook for 'blocks.0.q' is not callable"),
    ([(lambda name: name.startswith("nothing"), print)], "matches no hook point"),
    (["blocks.0.q"], "each hook is a pair"),
    ([("blocks.0.z", lambda v, n: v[:1])], "the hook on blocks.0.z returned shape"),
    ([("blocks.1.pattern", lambda v, n: v.T)], "blocks.1.pattern has shape"),
    ([("logits", lambda v, n: "text")], "the hook on logits returned something that is not"),
    ([("blocks.1.mlp_out", lambda v, n: 1 / 0)],
     "the hook on blocks.1.mlp_out raised ZeroDivisionError: division by zero"),
])
def test_bad_hooks_give_one_clear_error(tiny, hooks, message):
    model, ids = tiny
    with pytest.raises(HookError) as e:
        model.run_with_hooks(ids, hooks)
    assert message in str(e.value)
    assert isinstance(e.value, llamanp.LlamanpError)


def test_missing_activation_suggests_a_recorded_one(tiny):
    model, ids = tiny
    _, acts = model.run_with_cache(ids, ["blocks.0.pattern", "blocks.1.pattern"])
    assert set(acts) == {"blocks.0.pattern", "blocks.1.pattern"}
    with pytest.raises(KeyError, match="did you mean 'blocks.1.pattern'"):
        acts["blocks.1.patern"]
    with pytest.raises(HookError, match="did you mean 'blocks.0.pattern'"):
        model.run_with_cache(ids, ["blocks.0.patern"])


def test_cached_values_are_copies(tiny):
    model, ids = tiny
    _, a = model.run_with_cache(ids, ["blocks.0.attn_in", "blocks.0.q"])
    _, b = model.run_with_cache(ids[::-1], ["blocks.0.attn_in", "blocks.0.q"])
    _, again = model.run_with_cache(ids, ["blocks.0.attn_in", "blocks.0.q"])
    for name in a:
        assert not np.allclose(a[name], b[name])
        np.testing.assert_array_equal(a[name], again[name])


# ---------------------------------------------------------------------------
# the logit lens and the pictures, from the command line
# ---------------------------------------------------------------------------

LENS_CASE = case("lmw-tok-mha3_untied_eps6", "mha3_untied_eps6", "lmw", tokenizer=True)


@pytest.fixture(scope="module")
def lens_model(store):
    return store.lmw(LENS_CASE)


PROMPT = "the little cat sat under the big tree"


def test_cli_lens_prints_each_layers_top_tokens(store, lens_model):
    """The printed lens equals the final norm and output matrix of transformers'
    own hidden states, applied by hand."""
    ref = store.reference(LENS_CASE.spec)
    model = llamanp.load(lens_model)
    tok = model.tokenizer
    ids = tok.encode(PROMPT, bos=True)
    hidden, _, _ = hf_inside(ref.model, ids)
    head = ref.model.lm_head.weight.detach().double().numpy()
    normw = ref.model.model.norm.weight.detach().double().numpy()
    rc, out, err = run_cli("llama-np.py", "-w", lens_model, "-i", PROMPT, "--lens",
                           "--lens-top", "3")
    assert rc == 0, err
    rows = out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["embed", "0", "1", "2"]
    n = len(hidden) - 1
    for row, h in zip(rows, hidden[:n] + [None]):
        last = hidden[n][-1].astype(np.float64) if h is None else h[-1].astype(np.float64)
        if h is not None:                 # not yet normalised
            last = last / np.sqrt((last ** 2).mean() + R.SPEC_BY_NAME[LENS_CASE.spec].norm_eps) \
                * normw
        logits = head @ last
        p = np.exp(logits - logits.max())
        p /= p.sum()
        best = np.argsort(-p)[:3]
        shown = re.findall(r"('(?:[^'\\]|\\.)*'|\"[^\"]*\") ([0-9.]+)", row)
        assert [eval(s) for s, _ in shown] == [
            tok.token_bytes(int(i)).decode("utf-8", "replace") for i in best], row
        np.testing.assert_allclose([float(v) for _, v in shown], p[best], atol=1.5e-3)


def test_lens_last_row_is_the_model_prediction(tiny):
    model, ids = tiny
    lens = logit_lens(model, ids, k=2)
    logits = model.logits(ids)
    np.testing.assert_array_equal(lens.final_ids, logits.argmax(-1))
    np.testing.assert_array_equal(lens.top_ids[-1, :, 0], logits.argmax(-1))
    assert lens.top_ids.shape == (model.config.n_layers + 1, len(ids), 2)
    assert np.all(lens.top_probs[:, :, 0] >= lens.top_probs[:, :, 1])
    np.testing.assert_allclose(lens.final_probs[-1], lens.top_probs[-1, :, 0])


def test_cli_pictures(lens_model, tmp_path):
    pytest.importorskip("matplotlib", reason="the pictures need matplotlib (test extra)")
    import matplotlib.image
    lens_png, att_png = tmp_path / "lens.png", tmp_path / "att.png"
    rc, out, err = run_cli("llama-np.py", "-w", lens_model, "-i", PROMPT, "--lens",
                           "--lens-png", lens_png, "--attention-png", att_png, "--layer", "-1")
    assert rc == 0, err
    assert "wrote layer 2's attention patterns" in err
    for png in (lens_png, att_png):
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.05           # not blank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["att.png", "lens.png"]


@pytest.mark.parametrize("args,message", [
    (["--lens-top", "3"], "--lens-top only applies with --lens"),
    (["--lens-png", "x.png"], "--lens-png only applies with --lens"),
    (["--layer", "1"], "--layer only applies with --attention-png"),
    (["--lens", "--lens-top", "0"], "--lens-top must be >= 1"),
    (["--lens", "--batch"], "cannot be combined with --batch"),
    (["--attention-png", "{tmp}/a.png", "--chat"], "cannot be combined with --chat"),
    (["--attention-png", "{tmp}/a.png", "--layer", "3"], "--layer 3 is outside the model's "
                                                           "layers (0..2"),
    (["--attention-png", "{tmp}/no/such/a.png"], "does not exist"),
])
def test_cli_bad_inspect_flags(lens_model, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc, out, err = run_cli("llama-np.py", "-w", lens_model, "-i", PROMPT, *args)
    assert rc == 1 and err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_pictures_without_matplotlib(lens_model, tmp_path):
    """With matplotlib missing, one error line and no file."""
    block = ("import sys, runpy; sys.modules['matplotlib'] = None; "
             f"sys.argv = ['llama-np.py'] + sys.argv[1:]; "
             f"runpy.run_path({str(REPO / 'llama-np.py')!r}, run_name='__main__')")
    import subprocess
    for flag in ("--lens-png", "--attention-png"):
        extra = ["--lens"] if flag == "--lens-png" else []
        proc = subprocess.run([sys.executable, "-c", block, "-w", str(lens_model), "-i", PROMPT,
                               *extra, flag, str(tmp_path / "x.png")], capture_output=True,
                              text=True, cwd=str(REPO), timeout=300)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == (f"error: {flag} draws with matplotlib, which is not installed "
                               "(pip install matplotlib, or pip install 'llamanp[bench]')\n")
        assert proc.stdout == "" and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# docs/inspect.md's examples run (on a tiny model with the test tokenizer)
# ---------------------------------------------------------------------------

def test_doc_examples_run(lens_model, capsys):
    text = (REPO / "docs" / "inspect.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    code = "\n".join(blocks)
    assert 'fetch("smollm2")' in code
    code = code.replace('fetch("smollm2")', repr(str(lens_model)))
    assert "N = 50\n" in code
    code = code.replace("N = 50\n", "N = 40\n")    # the tiny model's context is 96
    exec(compile(code, "docs/inspect.md", "exec"), {})
    out = capsys.readouterr().out
    assert "logit lens at the last position" in out
