"""The book's diagrams, drawn in code so they rebuild with it: boxes, arrows and text in matplotlib, written as small,
deterministic SVGs (text stays text) into nbs/figures/, where the chapters show them as ![...](figures/NAME.svg).

    python book/scripts/diagrams.py [--out nbs/figures]

The letters are the book's dimensions (book/notation.md): B batch, T query length, S key length, D model width,
H query heads, K key/value heads, G = H/K, d head width, V vocabulary, L layers, F MLP width, E experts, k experts per
token, W window."""
import argparse
import io
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle
from matplotlib.textpath import TextPath

# Text stays text, in the reader's sans-serif if DejaVu Sans (whose widths the layout is measured with) is missing
plt.rcParams.update({"svg.hashsalt": "llmjax", "svg.fonttype": "none", "font.family": "sans-serif",
                     "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"], "font.size": 9})

INK, MUTED, FAINT = "#1f2933", "#7b8794", "#e4e7eb"
CHANGED = "#c2185b"                       # what an architecture changes, in every figure
FILL = {"embed": ("#ede7f6", "#5e35b1"), "norm": ("#e3f2fd", "#1e6bb8"), "attention": ("#fff3e0", "#d9730d"),
        "mlp": ("#e8f5e9", "#2e7d32"), "block": ("#f7f8fa", "#9aa5b1"), "cache": ("#e3f2fd", "#1e6bb8"),
        "new": ("#ffe0b2", "#d9730d"), "empty": ("#ffffff", "#bcc4cc"), "off": ("#f5f6f7", "#c3c9cf")}
GROUPS = ["#1e6bb8", "#d9730d", "#2e7d32", "#8e24aa", "#c62828", "#00838f", "#6d4c41", "#546e7a"]


def canvas(width: float, height: float):
    """A figure whose data units are inches, origin bottom left, no axes."""
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    return fig, ax


def label(ax, x, y, text, size=8, color=INK, ha="center", **kwargs):
    """Text centred vertically on y (and, unless ha says otherwise, horizontally on x)."""
    ax.text(x, y, text, ha=ha, va="center", fontsize=size, color=color, **kwargs)


def box(ax, x, y, w, h, text="", kind="block", changed=False, size=9, dashed=False, color=None, weight="normal",
        rounded=True):
    """A box centred on (x, y), rounded unless it is a cell of a row; a changed one has a thick magenta edge."""
    face, edge = FILL[kind]
    style = "round,pad=0,rounding_size=0.05" if rounded else "square,pad=0"
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style,
                                facecolor=face, edgecolor=CHANGED if changed else edge, lw=1.8 if changed else 0.9,
                                linestyle=(0, (3, 2)) if dashed else "-"))
    if text:
        label(ax, x, y, text, size=size, color=color or INK, weight=weight)


def arrow(ax, start, end, color=INK, lw=0.9, style="-|>", connection="arc3", shrink=0, alpha=1.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=8, color=color, lw=lw, alpha=alpha,
                                 connectionstyle=connection, shrinkA=shrink, shrinkB=shrink))


def line(ax, xs, ys, color=INK, lw=0.9, **kwargs):
    ax.plot(xs, ys, color=color, lw=lw, solid_capstyle="butt", **kwargs)


def plus(ax, x, y, r=0.1, color=INK):
    """A residual add: a circled +."""
    ax.add_patch(Circle((x, y), r, facecolor="white", edgecolor=color, lw=0.9))
    line(ax, [x - r * 0.6, x + r * 0.6], [y, y], color)
    line(ax, [x, x], [y - r * 0.6, y + r * 0.6], color)


def save(fig, out: Path, name: str):
    """Write NAME.svg: no date, no clip paths, coordinates to 1/100 pt, no indentation (a few KB each)."""
    for artist in fig.axes[0].get_children():
        artist.set_clip_on(False)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = re.sub(r' transform="rotate\(-0 [^"]*\)"', "", buffer.getvalue())   # a rotation by 0
    parts = re.split(r"(<text.*?</text>)", svg, flags=re.DOTALL)                # round numbers, not words
    svg = "".join(part if part.startswith("<text") else re.sub(r"(\d\.\d\d)\d+", r"\1", part) for part in parts)
    kept, opened = [], []             # drop the <g id="patch_12"> ... </g> wrapped round each element
    for row in re.sub(r"\n\s+", "\n", svg).split("\n"):
        if row.startswith("<g"):
            opened.append(re.fullmatch(r'<g id="(patch|text|line2d)_\d+">', row) is None)
            if not opened[-1]:
                continue
        elif row == "</g>" and not opened.pop():
            continue
        kept.append(row)
    (out / f"{name}.svg").write_text("\n".join(kept))


# The decoder: one column per architecture, the same slots in each so the figures line up. A changed part is drawn
# in magenta; `notes` are the callouts of the one-architecture figures, (slot, text, changed).
ARCHITECTURES = {
    "gpt2": dict(
        title="GPT-2", embed="token + position embedding", norm="LayerNorm", attention="multi-head attention",
        mlp="GELU MLP", post=False, head="LM head (tied)", changed=(),
        notes=[("embed", "a learned position table, added to the token embedding", False),
               ("norm1", "LayerNorm: subtract the mean, divide by the spread, scale and shift", False),
               ("attention", "H heads, each with its own keys and values;\nbiases on every projection", False),
               ("mlp", "D → F = 4D → D, GELU (tanh), with biases", False),
               ("head", "the token embedding, transposed: [B, T, D] → [B, T, V]", False)]),
    "llama": dict(
        title="LLaMA", embed="token embedding", norm="RMSNorm", attention="GQA + RoPE",
        mlp="SwiGLU MLP", post=False, head="LM head", changed=("embed", "norm", "attention", "mlp"),
        notes=[("embed", "no position table: positions enter attention as RoPE", True),
               ("norm1", "RMSNorm: divide by the root mean square, scale; no mean, no shift", True),
               ("attention", "K ≤ H key/value heads, G = H/K queries each;\nRoPE rotates q and k; no biases", True),
               ("mlp", "gated: (silu(x W_gate) ⊙ x W_up) W_down, F ≈ 8D/3;\nno biases", True),
               ("head", "tied in small models (SmolLM2), its own matrix in large ones", False)]),
    "gemma": dict(
        title="Gemma", embed="token embedding × √D", norm="RMSNorm (1 + w)", attention="GQA + RoPE, local | global",
        mlp="GeGLU MLP", post=True, head="LM head (tied), soft-cap",
        changed=("embed", "norm", "attention", "mlp", "post", "head"),
        notes=[("embed", "× √D: the tied table's small rows start the stream at unit scale (1)", True),
               ("norm1", "every RMSNorm scales by 1 + w, not w (1)", True),
               ("attention", ("heads d = 256 wide (1); local layers see only the last W keys:\n"
                              "alternating with global ones (2), five local to one global (3);\n"
                              "logits soft-capped (2); QK-norm: q and k RMS-normalised per head (3)"), True),
               ("post1", "post-norms on each sub-layer's output (2, 3)", True),
               ("mlp", "GeGLU: the gated MLP with tanh-GELU (1)", True),
               ("head", "tied; logits soft-capped, c·tanh(x / c) (2)", True)]),
}
BOX_W, BOX_H, STEP = 1.9, 0.3, 0.44
SLOTS = ["embed", "norm1", "attention", "post1", "add1", "norm2", "mlp", "post2", "add2", "final", "head"]


def slot_heights(bottom: float) -> dict:
    """y of each slot, bottom up; the block's slots sit between embed and final."""
    heights, y = {}, bottom
    for slot in SLOTS:
        heights[slot] = y
        y += STEP + (0.12 if slot in ("embed", "add2") else 0)   # room for the block's frame
    return heights


def decoder_column(ax, x, bottom, arch: dict):
    """One architecture's decoder, token ids at the bottom, logits at the top; returns each slot's (x_right, y)."""
    at = slot_heights(bottom)
    changed = set(arch["changed"])
    frame_lo, frame_hi = at["norm1"] - BOX_H / 2 - 0.2, at["add2"] + 0.2
    ax.add_patch(FancyBboxPatch((x - BOX_W / 2 - 0.4, frame_lo), BOX_W + 0.54, frame_hi - frame_lo,
                                boxstyle="round,pad=0,rounding_size=0.08", facecolor=FILL["block"][0],
                                edgecolor=FILL["block"][1], lw=0.8))
    ax.text(x + BOX_W / 2 + 0.1, frame_hi - 0.08, "× L", ha="right", va="top", color=MUTED, weight="bold")
    label(ax, x, at["embed"] - STEP + 0.05, "token ids [B, T]", size=8.5)
    arrow(ax, (x, at["embed"] - STEP + 0.15), (x, at["embed"] - BOX_H / 2))
    parts = {"embed": (arch["embed"], "embed"), "norm1": (arch["norm"], "norm"), "norm2": (arch["norm"], "norm"),
             "attention": (arch["attention"], "attention"), "mlp": (arch["mlp"], "mlp"),
             "final": (arch["norm"], "norm"), "head": (arch["head"], "embed")}
    if arch["post"]:
        parts |= {"post1": (arch["norm"], "norm"), "post2": (arch["norm"], "norm")}
    for slot, (text, kind) in parts.items():
        group = "norm" if slot in ("norm1", "norm2", "final") else "post" if slot.startswith("post") else slot
        box(ax, x, at[slot], BOX_W, BOX_H, text, kind, changed=group in changed, size=8.5)
    previous = "embed"   # the main path, bottom up: each box or add to the next that is drawn
    for slot in SLOTS[1:]:
        if slot not in parts and not slot.startswith("add"):
            continue
        top_of_previous = at[previous] + (0.1 if previous.startswith("add") else BOX_H / 2)
        bottom_of_this = at[slot] - (0.1 if slot.startswith("add") else BOX_H / 2)
        arrow(ax, (x, top_of_previous), (x, bottom_of_this))
        previous = slot
    for add, start in (("add1", at["norm1"] - BOX_H / 2 - 0.1), ("add2", at["add1"] + 0.18)):
        plus(ax, x, at[add])
        skip = x - BOX_W / 2 - 0.22
        line(ax, [x, skip, skip], [start, start, at[add]], MUTED)
        arrow(ax, (skip, at[add]), (x - 0.1, at[add]), MUTED)
    label(ax, x - BOX_W / 2 - 0.3, (at["norm2"] + at["mlp"]) / 2, "residual stream [B, T, D]", size=7,
          color=MUTED, rotation=90)
    arrow(ax, (x, at["head"] + BOX_H / 2), (x, at["head"] + STEP - 0.15))
    label(ax, x, at["head"] + STEP - 0.05, "logits [B, T, V]", size=8.5)
    return {slot: (x + BOX_W / 2, y) for slot, y in at.items()}


def decoder_comparison(out: Path):
    """GPT-2, LLaMA and Gemma 2 side by side, each change from the column before in magenta."""
    fig, ax = canvas(8, 6.35)
    for i, name in enumerate(("gpt2", "llama", "gemma")):
        arch = ARCHITECTURES[name]
        x = 1.42 + 2.62 * i
        decoder_column(ax, x, 0.72, arch)
        title = "Gemma 2" if name == "gemma" else arch["title"]   # Gemma 1 has no post-norms, 3 no soft-caps
        label(ax, x, 6.12, title, size=11, weight="bold")
    label(ax, 4, 0.12, "magenta: changed from the column to the left; LLaMA and Gemma also drop every bias",
          color=MUTED)
    save(fig, out, "decoder")


def decoder_figure(out: Path, name: str):
    """One architecture's decoder with a callout per part: what it is, or what it changed (magenta)."""
    arch = ARCHITECTURES[name]
    fig, ax = canvas(8, 6.35)
    anchors = decoder_column(ax, 1.55, 0.72, arch)
    label(ax, 1.55, 6.12, arch["title"], size=11, weight="bold")
    for slot, text, changed in arch["notes"]:
        x_right, y = anchors[slot]
        line(ax, [x_right + 0.06, 3.0], [y, y], CHANGED if changed else MUTED, lw=0.6, ls=":")
        label(ax, 3.08, y, text, ha="left", size=8.5, color=CHANGED if changed else INK, linespacing=1.3)
    key = {"gpt2": "the template the later models change",
           "llama": "magenta: what LLaMA changes from GPT-2",
           "gemma": "magenta: what Gemma changes from LLaMA;\n(1), (2), (3): the generation that brought it"}[name]
    label(ax, 3.08, 0.2, key, ha="left", color=MUTED, linespacing=1.3)
    save(fig, out, f"decoder_{name}")


def gqa(out: Path):
    """H query heads over K key/value heads, G = H/K queries each: MHA (K = H), GQA, MQA (K = 1)."""
    H, cell = 8, 0.24
    fig, ax = canvas(8, 2.75)
    label(ax, 0.08, 1.95, "H = 8\nquery heads", ha="left", size=8.5)
    label(ax, 0.08, 0.83, "K key/value\nheads", ha="left", size=8.5)
    for p, (title, K) in enumerate([("multi-head (MHA)", 8), ("grouped-query (GQA)", 2), ("multi-query (MQA)", 1)]):
        G, cx = H // K, 2.05 + 2.3 * p
        label(ax, cx, 2.55, title, size=9.5, weight="bold")
        label(ax, cx, 2.33, f"K = {K}, G = H/K = {G}", size=8.5)
        gap = 0.08 if 1 < G < H else 0.0                     # set the groups apart
        qx = cx + (np.arange(H) - (H - 1) / 2) * 0.26 + (np.arange(H) // G - (K - 1) / 2) * gap
        kx = cx + (np.arange(K) - (K - 1) / 2) * (0.26 if K == H else 1.12)
        for h in range(H):
            color = GROUPS[h // G]
            ax.add_patch(Rectangle((qx[h] - cell / 2, 1.83), cell, cell, facecolor=color, alpha=0.25,
                                   edgecolor=color, lw=0.8))
            label(ax, qx[h], 1.95, "q", size=7.5, color=color)
            line(ax, [qx[h], kx[h // G]], [1.83, 1.2], color, lw=0.8)
        for k in range(K):
            for row, name in enumerate(("k", "v")):
                y = 0.96 - row * 0.26
                ax.add_patch(Rectangle((kx[k] - cell / 2, y), cell, cell, facecolor=GROUPS[k], alpha=0.45,
                                       edgecolor=GROUPS[k], lw=0.8))
                label(ax, kx[k], y + cell / 2, name, size=7.5)
        label(ax, cx, 0.38, f"cache: 2·K·d = {2 * K}d numbers\nper token and layer", linespacing=1.25)
    label(ax, 4.35, 0.06, "each query head reads the keys and values of its group's one key/value head: "
          "G times less cache than MHA", color=MUTED)
    save(fig, out, "gqa")


def rope(out: Path):
    """A vector's d features as d/2 pairs, each rotated by position × its own frequency: fast pairs, slow pairs."""
    d, base, positions = 8, 100.0, range(6)
    theta = base ** (-np.arange(0, d, 2) / d)
    sub = lambda n: "".join(chr(0x2080 + int(c)) for c in str(n))   # 12 -> ₁₂
    fig, ax = canvas(8, 3.5)
    label(ax, 0.15, 3.2, "x: one head of a query or key, d = 8", ha="left", size=9)
    for j in range(d):
        pair = j % (d // 2)
        ax.add_patch(Rectangle((3.0 + 0.42 * j, 3.03), 0.38, 0.34, facecolor=GROUPS[pair], alpha=0.25,
                               edgecolor=GROUPS[pair], lw=0.8))
        label(ax, 3.19 + 0.42 * j, 3.2, f"x{sub(j)}", size=8.5)
    label(ax, 6.45, 3.2, "pair i: features\ni and i + d/2", ha="left", size=8.5)
    label(ax, 4.0, 2.6, "position t turns pair i by the angle t·θᵢ, with θᵢ = base^(−2i/d) · arrows: t = 0 … 5",
          size=9)
    r = 0.58
    for i, step in enumerate(theta):
        cx, cy, color = 1.05 + 1.95 * i, 1.62, GROUPS[i]
        ax.add_patch(Circle((cx, cy), r, facecolor="white", edgecolor=FAINT, lw=0.8))
        line(ax, [cx - r - 0.08, cx + r + 0.08], [cy, cy], FAINT, lw=0.6)
        line(ax, [cx, cx], [cy - r - 0.08, cy + r + 0.08], FAINT, lw=0.6)
        for t in positions:
            angle = t * step
            arrow(ax, (cx, cy), (cx + r * np.cos(angle), cy + r * np.sin(angle)), color, 1.1, alpha=0.3 + 0.14 * t)
            if t in {0: positions, 1: (0, 5), 2: (0, 5), 3: (5,)}[i]:   # the slowest pair's arrows overlap
                label(ax, cx + (r + 0.15) * np.cos(angle), cy + (r + 0.15) * np.sin(angle) + 0.06 * (i == 3),
                      str(t) if i < 3 else "0 … 5", size=7, color=color, ha="center" if i < 3 else "left")
        label(ax, cx, 0.78, f"pair {i}: (x{sub(i)}, x{sub(i + d // 2)})", size=8.5, color=color, weight="bold")
        label(ax, cx, 0.54, f"θ{sub(i)} = {step:.3g} rad per position")
    label(ax, 4.0, 0.24, "fast pairs tell near positions apart, slow pairs far ones; a query·key score depends "
          "only on the distance tq − tk")
    label(ax, 4.0, 0.05, "(base 100 here, so that the slow pairs visibly turn; models use 10⁴ to 10⁶)", size=7.5,
          color=MUTED)
    save(fig, out, "rope")


def cell_row(ax, x0, y, texts, kinds, w, h=0.3, size=8):
    """A row of cells w wide, 0.04 apart, one kind (FILL key) each; empty ones dashed."""
    for j, (text, kind) in enumerate(zip(texts, kinds)):
        box(ax, x0 + j * (w + 0.04) + w / 2, y, w, h, text, kind, size=size, dashed=kind == "empty",
            color=MUTED if kind in ("empty", "off") else INK, rounded=False)


def legend(ax, x, y, entries, size=8):
    """Swatches with their meaning, left to right."""
    for kind, text in entries:
        box(ax, x + 0.12, y, 0.24, 0.16, kind=kind, dashed=kind == "empty", rounded=False)
        label(ax, x + 0.32, y, text, ha="left", size=size)
        x += 0.62 + TextPath((0, 0), text, size=size).get_extents().width / 72


def kv_cache(out: Path):
    """Prefill writes the prompt's keys and values in one call; each decode step appends one token's."""
    words = ["The", "cat", "sat", "on", "the", "mat", ".", "It"]
    S, prompt, w, x0 = 8, 5, 0.6, 1.55
    fig, ax = canvas(8, 3.55)
    label(ax, x0, 3.35, "one layer's KV cache: S = 8 slots, keys and values [B, K, S, d]", ha="left", size=9)
    for j in range(S):
        label(ax, x0 + j * (w + 0.04) + w / 2, 3.08, f"slot {j}", size=7, color=MUTED)
    label(ax, x0 + S * (w + 0.04) + 0.45, 3.08, "next token", size=7.5, color=MUTED)
    for r in range(4):
        y, filled = 2.75 - 0.72 * r, prompt + r
        new = range(prompt) if r == 0 else [filled - 1]
        kinds = ["new" if j in new else "cache" if j < filled else "empty" for j in range(S)]
        cell_row(ax, x0, y, [words[j] if j < filled else "" for j in range(S)], kinds, w)
        what, seen = ("prefill", f"T = {prompt} queries,") if r == 0 else (f"decode {r}", "T = 1 query,")
        label(ax, 0.1, y + 0.09, what, ha="left", size=9, weight="bold")
        label(ax, 0.1, y - 0.12, f"{seen} {filled} keys", ha="left", size=7.5)
        ox = x0 + S * (w + 0.04) + 0.45
        arrow(ax, (x0 + S * (w + 0.04) + 0.02, y), (ox - 0.3, y), MUTED)
        box(ax, ox, y, 0.56, 0.3, words[filled] if filled < S else "…", "new", size=8)
        if r < 3:   # the token made here is the next call's input
            arrow(ax, (ox - 0.1, y - 0.16), (x0 + filled * (w + 0.04) + w / 2 + 0.1, y - 0.72 + 0.16),
                  FILL["new"][1], 0.8, connection="arc3,rad=-0.12")
    legend(ax, 0.1, 0.12, [("new", "written by this call"), ("cache", "read from the cache"),
                           ("empty", "empty slot")])
    save(fig, out, "kv_cache")


def ring_buffer(out: Path):
    """A sliding-window layer's cache: W slots reused in turn, position j in slot j mod W."""
    W, n, w, ring = 4, 10, 0.3, 4.75
    fig, ax = canvas(8, 3.6)
    label(ax, 0.65, 3.38, "the sequence: the query at t sees keys t − W < j ≤ t", ha="left", size=9)
    label(ax, ring, 3.38, f"the ring: W = {W} slots, position j in slot j mod W", ha="left", size=9)
    for j in range(n):
        label(ax, 0.65 + j * (w + 0.04) + w / 2, 3.12, str(j), size=7, color=MUTED)
    for s in range(W):
        label(ax, ring + s * 0.54 + 0.25, 3.12, f"slot {s}", size=7, color=MUTED)
    for r, t in enumerate(range(2, 8)):
        y = 2.8 - 0.44 * r
        label(ax, 0.1, y, f"t = {t}", ha="left", size=8.5, weight="bold")
        kinds = ["new" if j == t else "cache" if t - W < j < t else "off" if j < t else "empty" for j in range(n)]
        cell_row(ax, 0.65, y, [str(j) if j <= t else "" for j in range(n)], kinds, w, h=0.28, size=7.5)
        arrow(ax, (4.1, y), (ring - 0.12, y), MUTED)
        held = [max((j for j in range(t + 1) if j % W == s), default=None) for s in range(W)]
        ring_kinds = ["empty" if j is None else "new" if j == t else "cache" for j in held]
        cell_row(ax, ring, y, ["" if j is None else f"{j}" for j in held], ring_kinds, 0.5, h=0.28, size=8)
        if t >= W:
            label(ax, ring + 4 * 0.54 + 0.08, y, f"{t} overwrites {t - W}", ha="left", size=7.5, color=MUTED)
    legend(ax, 0.1, 0.12, [("new", "the query's token, written now"), ("cache", "in the window, seen"),
                           ("off", "left the window: slot reused"), ("empty", "not yet")])
    save(fig, out, "ring_buffer")


def moe(out: Path):
    """One token through a mixture-of-experts layer: router probabilities, top-k, a weighted sum of k experts."""
    p = np.array([0.04, 0.31, 0.06, 0.03, 0.08, 0.36, 0.05, 0.07])
    E, k = len(p), 2
    chosen = sorted(np.argsort(p)[-k:])
    weights = p[chosen] / p[chosen].sum()
    fig, ax = canvas(8, 3.85)
    rows = 3.05 - 0.34 * np.arange(E)
    box(ax, 0.42, 1.86, 0.56, 0.44, "x\n[D]", "embed", size=8)
    label(ax, 0.42, 1.5, "one token", size=7.5, color=MUTED)
    box(ax, 1.55, 1.86, 1.25, 2.85, "", "attention")
    label(ax, 1.55, 1.86, "router\np = softmax(x W_g)\nW_g: [D, E]", linespacing=2.2)
    arrow(ax, (0.7, 1.86), (0.92, 1.86))
    label(ax, 2.42, 3.38, f"p; the top k = {k} in orange", ha="left")
    label(ax, 5.35, 3.38, f"E = {E} experts (MLPs)")
    for e, y in enumerate(rows):
        on = e in chosen
        color = FILL["new"][1] if on else FILL["off"][1]
        ax.add_patch(Rectangle((2.42, y - 0.1), 2.9 * p[e], 0.2, facecolor=color, alpha=0.8 if on else 0.6, lw=0))
        label(ax, 2.48 + 2.9 * p[e], y, f"{p[e]:.2f}", ha="left", size=7.5, color=INK if on else MUTED,
              weight="bold" if on else "normal")
        box(ax, 5.35, y, 1.1, 0.26, f"expert {e}", "mlp" if on else "off", size=8, dashed=not on,
            color=INK if on else MUTED)
    bus = 4.55                                              # x travels to the chosen experts only
    line(ax, [0.42, 0.42, bus, bus], [2.08, 3.65, 3.65, rows[chosen[-1]]], MUTED, lw=0.8)
    label(ax, bus - 0.06, 3.55, "x", ha="right", color=MUTED)
    for e in chosen:
        arrow(ax, (bus, rows[e]), (4.8, rows[e]), MUTED)
    add = (7.0, 1.86)
    for e, weight in zip(chosen, weights):
        arrow(ax, (5.9, rows[e]), (add[0] - 0.08, add[1] + 0.06 * np.sign(rows[e] - add[1])), INK, 0.9)
        label(ax, 6.0, rows[e] + 0.14 * np.sign(rows[e] - add[1]), f"× {weight:.2f}", ha="left",
              color=FILL["new"][1])
    plus(ax, *add)
    arrow(ax, (add[0] + 0.1, add[1]), (7.45, add[1]))
    label(ax, 7.55, add[1], "y\n[D]", ha="left")
    label(ax, 4.0, 0.12, "the weights are the top-k probabilities renormalised to sum to 1; the other experts "
          "do no work for this token", color=MUTED)
    save(fig, out, "moe")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "nbs" / "figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    decoder_comparison(args.out)
    for name in ARCHITECTURES:
        decoder_figure(args.out, name)
    gqa(args.out)
    rope(args.out)
    kv_cache(args.out)
    ring_buffer(args.out)
    moe(args.out)


if __name__ == "__main__":
    main()
