"""Synthetic LaTeX-OCR dataset, rendered offline with matplotlib mathtext.

Formulas come from a small recursive grammar (fractions, roots, big operators with limits, greek letters,
sub/superscripts, accents, functions, small matrices) and are drawn with matplotlib's own TeX subset on the
Agg backend, so no TeX install and no network are needed. The parquet files have the columns of the public
LaTeX_OCR datasets on the Hugging Face hub (``unsloth/LaTeX_OCR``, ``linxy/LaTeX_OCR``): ``image`` (the
``datasets.Image`` feature, PNG bytes) and ``text`` (the LaTeX source, without ``$`` delimiters), so a
recipe written for those datasets runs on these files unchanged.

Run::

    vlmtune make-data latex-ocr --n 500 --out data/latex_ocr --seed 0

or from Python::

    from vlmtune.data.latex_ocr import make_latex_ocr
    paths = make_latex_ocr(500, "data/latex_ocr", seed=0)  # {"train": ..., "test": ...}
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import datasets
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

logger = logging.getLogger(__name__)

MAX_DEPTH = 3
"""Deepest nesting of fractions, roots, groups, ... in one formula."""
MIN_CHARS, MAX_CHARS = 3, 150
"""Formulas outside this length are redrawn (rejection sampling keeps the grammar simple)."""
FONTSIZE_RANGE = (10, 20)
DPI_RANGE = (80, 150)
"""Per-sample font size (points) and dpi, so images vary in size like real scans and crops."""
MATH_FONTFAMILY = "cm"
"""Computer Modern, the look of the pdflatex renders in the public LaTeX_OCR datasets."""
PAD_INCHES = 0.1
"""White margin around the ink; passed explicitly so the user's savefig rcParams do not change the bytes."""
MAX_RENDER_ATTEMPTS = 100
"""Consecutive mathtext failures after which the grammar, not bad luck, is to blame."""

LATIN = list("abcdefghkmnpqrstuvwxyz") + list("ABCFGLMNPRSTX")
GREEK = [
    r"\alpha", r"\beta", r"\gamma", r"\delta", r"\epsilon", r"\varepsilon", r"\zeta", r"\eta", r"\theta",
    r"\kappa", r"\lambda", r"\mu", r"\nu", r"\xi", r"\pi", r"\rho", r"\sigma", r"\tau", r"\phi", r"\varphi",
    r"\chi", r"\psi", r"\omega", r"\Gamma", r"\Delta", r"\Theta", r"\Lambda", r"\Sigma", r"\Phi", r"\Psi",
    r"\Omega",
]  # fmt: skip
BINARY_OPERATORS = [
    "+", "-", "=", "<", ">", r"\cdot", r"\times", r"\pm", r"\leq", r"\geq", r"\neq", r"\approx",
]  # fmt: skip
FUNCTIONS = [r"\sin", r"\cos", r"\tan", r"\log", r"\ln", r"\exp"]
ACCENTS = [r"\hat", r"\bar", r"\vec", r"\dot", r"\tilde"]
INDICES = ["i", "j", "k", "n", "0", "1", "i+1", "n-1", "ij"]
EXPONENTS = ["2", "3", "n", "k", "-1", r"\prime", "2n", r"\infty"]
DELIMITERS = [("(", ")"), ("[", "]"), (r"\{", r"\}"), ("|", "|")]


# ---------------------------------------------------------------------------------------------------------
# Grammar. Every builder returns a complete LaTeX fragment that renders on its own, and none returns a
# fragment ending in a script, so callers may add one ^ or _ without mathtext's "Double superscript" error.
# ---------------------------------------------------------------------------------------------------------


def random_formula(rng: random.Random) -> str:
    r"""Draws a random LaTeX formula that matplotlib mathtext can render.

    Args:
        rng: The only source of randomness; the same state gives the same formula.

    Returns:
        LaTeX source without ``$`` delimiters, ``MIN_CHARS`` to ``MAX_CHARS`` characters long, e.g.
        ``\frac{\partial u}{\partial t} = \sum_{k=1}^{n} \hat{x}_{k}^{2}``.
    """
    while True:
        depth = rng.randint(0, MAX_DEPTH)
        formula = _expression(rng, depth, max_terms=4)
        if MIN_CHARS <= len(formula) <= MAX_CHARS:
            return formula


def _expression(rng: random.Random, depth: int, max_terms: int) -> str:
    r"""Terms joined by binary operators or relations, e.g. ``a + \frac{1}{2} \leq x``."""
    parts = [_term(rng, depth)]
    for _ in range(rng.randint(0, max_terms - 1)):
        parts += [rng.choice(BINARY_OPERATORS), _term(rng, depth)]
    return " ".join(parts)


def _term(rng: random.Random, depth: int) -> str:
    """One term; at depth 0 only leaves (symbols, scripts, accents), so recursion stops."""
    leaves = [_symbol, _scripted, _accented]
    if depth == 0:
        return rng.choice(leaves)(rng)
    nodes = [_fraction, _root, _big_operator, _function, _limit, _derivative, _group, _matrix]
    builder = rng.choice(leaves + nodes)
    return builder(rng) if builder in leaves else builder(rng, depth - 1)


def _symbol(rng: random.Random) -> str:
    """A variable, greek letter or number."""
    kind = rng.random()
    if kind < 0.45:
        return rng.choice(LATIN)
    if kind < 0.7:
        return rng.choice(GREEK)
    if kind < 0.95:
        return str(rng.randint(0, 9) if rng.random() < 0.7 else rng.randint(10, 99))
    return f"{rng.randint(0, 9)}.{rng.randint(0, 99)}"


def _scripted(rng: random.Random) -> str:
    """A symbol with a subscript, a superscript or both, e.g. ``x_{i}^{2}``."""
    base = rng.choice(LATIN + GREEK)
    kind = rng.randrange(3)
    if kind == 0:
        return f"{base}_{{{rng.choice(INDICES)}}}"
    if kind == 1:
        return f"{base}^{{{rng.choice(EXPONENTS)}}}"
    return f"{base}_{{{rng.choice(INDICES)}}}^{{{rng.choice(EXPONENTS)}}}"


def _accented(rng: random.Random) -> str:
    r"""An accented variable, sometimes with a subscript, e.g. ``\vec{v}_{i}``."""
    accented = f"{rng.choice(ACCENTS)}{{{rng.choice(LATIN + GREEK)}}}"
    return f"{accented}_{{{rng.choice(INDICES)}}}" if rng.random() < 0.3 else accented


def _fraction(rng: random.Random, depth: int) -> str:
    r"""``\frac{num}{den}``; mathtext needs the braces (``\frac12`` is a parse error)."""
    return rf"\frac{{{_expression(rng, depth, 2)}}}{{{_expression(rng, depth, 2)}}}"


def _root(rng: random.Random, depth: int) -> str:
    r"""``\sqrt{x}`` or ``\sqrt[n]{x}``."""
    radicand = _expression(rng, depth, 2)
    if rng.random() < 0.5:
        return rf"\sqrt{{{radicand}}}"
    return rf"\sqrt[{rng.choice(['3', '4', 'n', 'k', 'p'])}]{{{radicand}}}"


def _big_operator(rng: random.Random, depth: int) -> str:
    r"""A sum, product or integral with limits followed by its body, e.g. ``\int_{0}^{\infty} f \, dx``."""
    operator = rng.choice([r"\sum", r"\prod", r"\int"])
    body = _term(rng, depth)
    if operator == r"\int":
        lower, upper = rng.choice([("0", r"\infty"), ("0", "1"), ("a", "b"), (r"-\infty", r"\infty")])
        return rf"\int_{{{lower}}}^{{{upper}}} {body} \, d{rng.choice(['x', 't', 's', 'u'])}"
    index = rng.choice(["i", "j", "k", "n"])
    lower = f"{index}={rng.choice(['0', '1'])}"
    upper = rng.choice(["n", "N", "m", r"\infty", "10"])
    return rf"{operator}_{{{lower}}}^{{{upper}}} {body}"


def _function(rng: random.Random, depth: int) -> str:
    r"""A named function applied to a symbol or a parenthesised argument, e.g. ``\log \left( x \right)``."""
    name = rng.choice(FUNCTIONS)
    if rng.random() < 0.4:
        return f"{name} {_symbol(rng)}"
    return rf"{name} \left( {_expression(rng, depth, 2)} \right)"


def _limit(rng: random.Random, depth: int) -> str:
    r"""``\lim_{x \to a} body``."""
    variable, target = rng.choice([("x", "0"), ("n", r"\infty"), ("x", r"\infty"), ("h", "0"), ("t", "a")])
    return rf"\lim_{{{variable} \to {target}}} {_term(rng, depth)}"


def _derivative(rng: random.Random, depth: int) -> str:
    r"""A partial derivative, e.g. ``\frac{\partial^{2} u}{\partial x^{2}}``."""
    function, variable = rng.choice(["f", "u", "y", r"\phi", r"\psi"]), rng.choice(["x", "y", "t", "z"])
    if rng.random() < 0.5:
        return rf"\frac{{\partial {function}}}{{\partial {variable}}}"
    return rf"\frac{{\partial^{{2}} {function}}}{{\partial {variable}^{{2}}}}"


def _group(rng: random.Random, depth: int) -> str:
    """A sub-expression in stretchy delimiters, sometimes raised to a power."""
    left, right = rng.choice(DELIMITERS)
    group = rf"\left{left} {_expression(rng, depth, 3)} \right{right}"
    return f"{group}^{{{rng.choice(EXPONENTS)}}}" if rng.random() < 0.3 else group


def _matrix(rng: random.Random, depth: int) -> str:
    r"""A 2x2 to 3x3 matrix of leaves, e.g. ``\left( \substack{a \\ c} \quad \substack{b \\ d} \right)``.

    Mathtext (matplotlib 3.11) has no ``\begin{matrix}``, ``pmatrix``, ``array`` or ``\matrix``: all are
    "Unknown symbol" errors. A column of ``\substack`` between ``\left( ... \right)`` renders as a
    matrix with entries at full size; ``\genfrac{}{}{0}{}{a}{b}`` also renders but in text style (small
    entries) and shrinks again when nested for a third row, so it is not used.
    """
    rows, columns = rng.randint(2, 3), rng.randint(2, 3)
    left, right = rng.choice(DELIMITERS[:2])
    stacks = [
        r"\substack{" + r" \\ ".join(rng.choice([_symbol, _scripted])(rng) for _ in range(rows)) + "}"
        for _ in range(columns)
    ]
    return rf"\left{left} " + r" \quad ".join(stacks) + rf" \right{right}"


# ---------------------------------------------------------------------------------------------------------
# Rendering and writing.
# ---------------------------------------------------------------------------------------------------------


def render_formula(latex: str, fontsize: int, dpi: int) -> bytes:
    """Renders a formula to PNG bytes: black on white, cropped to the ink plus a small margin.

    Uses a standalone ``Figure`` on the Agg canvas: no pyplot figure registry and no rcParams changes, so it
    neither disturbs nor depends on the caller's plotting state. The output is byte-deterministic for the same
    inputs and matplotlib install.

    Args:
        latex: LaTeX source without ``$`` delimiters.
        fontsize: Font size in points.
        dpi: Resolution; the image is about ``fontsize * dpi / 72`` pixels per line of text.

    Returns:
        PNG bytes of an RGB image.

    Raises:
        ValueError: If mathtext cannot parse ``latex``.
    """
    figure = Figure()
    FigureCanvasAgg(figure)
    # usetex and the math font are set per text rather than through rcParams, which are process-global.
    figure.text(0, 0, f"${latex}$", fontsize=fontsize, color="black", usetex=False, math_fontfamily=MATH_FONTFAMILY)
    rgba_png = io.BytesIO()
    # matplotlib stamps a "Software: Matplotlib version ..." tEXt chunk by default; None drops it so the bytes
    # depend only on the pixels.
    figure.savefig(
        rgba_png,
        format="png",
        dpi=dpi,
        bbox_inches="tight",
        pad_inches=PAD_INCHES,
        facecolor="white",
        metadata={"Software": None},
    )
    # Agg writes RGBA; the alpha is opaque everywhere on a white face, and RGB is what VLM processors expect.
    rgb_png = io.BytesIO()
    with Image.open(rgba_png) as image:
        image.convert("RGB").save(rgb_png, format="PNG")
    return rgb_png.getvalue()


def make_latex_ocr(n: int, out_dir: str | Path, seed: int = 0, test_fraction: float = 0.1) -> dict[str, Path]:
    """Writes a synthetic LaTeX-OCR dataset as ``train.parquet`` and ``test.parquet``.

    Both files have exactly the columns of ``unsloth/LaTeX_OCR``: ``image`` (``datasets.Image``, a struct of
    PNG ``bytes`` and a ``None`` ``path``) and ``text`` (the LaTeX source). The same arguments give the same
    bytes in both files.

    Args:
        n: Total number of samples, at least 1.
        out_dir: Folder to write into; created if missing.
        seed: Seed of the one ``random.Random`` behind formulas, font sizes and dpis.
        test_fraction: Share of the ``n`` samples in the test split, in ``[0, 1)``; the first
            ``n - round(n * test_fraction)`` samples form the train split (which keeps at least one sample).

    Returns:
        ``{"train": path, "test": path}``.

    Raises:
        ValueError: If ``n`` or ``test_fraction`` is out of range.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    rng = random.Random(seed)
    samples = [_draw_sample(rng) for _ in range(n)]
    n_train = n - min(round(n * test_fraction), n - 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.parquet", "test": out_dir / "test.parquet"}
    _write_split(samples[:n_train], paths["train"])
    _write_split(samples[n_train:], paths["test"])
    logger.info("Wrote %d train and %d test LaTeX-OCR samples to %s", n_train, n - n_train, out_dir)
    return paths


def _draw_sample(rng: random.Random) -> tuple[bytes, str]:
    """Draws a formula, font size and dpi, and renders them; redraws if mathtext rejects the formula.

    Returns:
        ``(png_bytes, latex)``.
    """
    for _ in range(MAX_RENDER_ATTEMPTS):
        latex = random_formula(rng)
        fontsize, dpi = rng.randint(*FONTSIZE_RANGE), rng.randint(*DPI_RANGE)
        try:
            return render_formula(latex, fontsize, dpi), latex
        except ValueError as error:
            # The grammar is meant to emit only renderable LaTeX; a failure is a grammar bug worth seeing,
            # but one bad formula should not sink a whole dataset.
            logger.warning("mathtext could not render %r, drawing another formula: %s", latex, error)
    raise RuntimeError(f"mathtext rejected {MAX_RENDER_ATTEMPTS} formulas in a row; the grammar is broken")


def _write_split(samples: list[tuple[bytes, str]], path: Path) -> None:
    """Writes ``(png_bytes, latex)`` rows to parquet with the Hugging Face ``image``/``text`` schema."""
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = {
        "image": [{"bytes": png, "path": None} for png, _ in samples],
        "text": [latex for _, latex in samples],
    }
    # from_dict with features stores the Image struct and the "huggingface" schema metadata that
    # load_dataset("parquet") reads to decode the column to PIL images.
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
