"""Integer LSTM: gate arithmetic on integers, sigmoid and tanh as piecewise-linear tables fitted on
calibration data, and the bit-exact numpy reference of ptqcli's IntLSTM operator.

The idea is that of the integer-only RNN papers (iRNN): with int8 weights and inputs, the gate
pre-activations are int32 sums that a per-row fixed-point multiplier turns into Q3.12 values;
sigmoid and tanh are read off piecewise-linear tables (knots, values and slopes, all integers);
the cell state is int16 in a fixed-point format chosen from the cell values calibration saw; the
hidden state is o * tanh(c) in Q0.15, and feeds the recurrence as that int16 (int8 x int16
products summed in int64), so that no rounding of h is summed over every unit at every step.

Where the knots go is fitted post-training: the optimal knot density of a piecewise-linear
interpolant under an input density p is proportional to (p f''^2)^(1/5), so knots follow the
gate pre-activations calibration produced, and the values at the knots are then a least-squares
fit on those same samples.

ONNX LSTM conventions: W [D, 4H, F], R [D, 4H, H], B [D, 8H], gates in the order i, o, f, c.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ops import attr

GATE_FRAC = 12  # gate pre-activations: Q3.12 in int16
OUT_FRAC = 15  # sigmoid / tanh values: Q0.15
ACC_SHIFT = 24  # fractional bits of the per-row multipliers beyond GATE_FRAC
SLOPE_FRAC = 16
INT16_MAX = 32767
SEGMENTS = 16
TABLES = ("sigmoid", "tanh", "cell_tanh")  # gates i, o, f; gate c; tanh of the cell


@dataclass(frozen=True)
class Pwl:
    """A piecewise-linear function on integers: y = values[k] + slopes[k] (x - knots[k]) / 2^16
    between knots k and k + 1, values[0] below the first knot and values[-1] above the last."""

    knots: np.ndarray  # int32, strictly increasing
    values: np.ndarray  # int32
    slopes: np.ndarray  # int64, one fewer

    @staticmethod
    def of(knots: np.ndarray, values: np.ndarray) -> "Pwl":
        knots, values = knots.astype(np.int64), values.astype(np.int64)
        slopes = np.rint((values[1:] - values[:-1]) * 2.0**SLOPE_FRAC / (knots[1:] - knots[:-1])).astype(np.int64)
        return Pwl(knots.astype(np.int32), values.astype(np.int32), slopes)


def pwl_eval(table: Pwl, x: np.ndarray) -> np.ndarray:
    """The table at integer inputs x (int64 out), exactly as the operator computes it."""
    x = x.astype(np.int64)
    k = np.clip(np.searchsorted(table.knots, x, side="right") - 1, 0, len(table.slopes) - 1)
    inside = table.values[k].astype(np.int64) + (
        (table.slopes[k] * (x - table.knots[k]) + (1 << (SLOPE_FRAC - 1))) >> SLOPE_FRAC)
    y = np.where(x <= table.knots[0], table.values[0], np.where(x >= table.knots[-1], table.values[-1], inside))
    return np.clip(y, -INT16_MAX, INT16_MAX)


# --------------------------------------------------------------------------- fitting

def _curvature(name: str, x: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-x))
        return np.abs(s * (1 - s) * (1 - 2 * s))
    t = np.tanh(x)
    return np.abs(-2 * t * (1 - t * t))


def _function(name: str, x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x)) if name == "sigmoid" else np.tanh(x)


def fit_pwl(name: str, samples: np.ndarray, frac: int, segments: int = SEGMENTS) -> Pwl:
    """sigmoid or tanh (`name`; "cell_tanh" is tanh) as a table over inputs in Q(frac), fitted to
    `samples` (float inputs the function met on calibration data)."""
    f = "sigmoid" if name == "sigmoid" else "tanh"
    limit = INT16_MAX / 2.0**frac
    s = np.clip(np.asarray(samples, dtype=np.float64).ravel(), -limit, limit)
    lo, hi = float(s.min()), float(s.max())
    if hi - lo < 1e-3:  # a constant input: widen to a small interval around it
        lo, hi = lo - 0.5, hi + 0.5
    grid = np.linspace(lo, hi, 2049)
    density, _ = np.histogram(s, bins=len(grid) - 1, range=(lo, hi))
    density = density / max(density.sum(), 1) + 1e-3 / (len(grid) - 1)  # every region gets some knots
    centres = (grid[1:] + grid[:-1]) / 2
    weight = (density * _curvature(f, centres) ** 2 + 1e-12) ** 0.2
    cumulative = np.concatenate([[0], np.cumsum(weight)])
    knots = np.interp(np.linspace(0, cumulative[-1], segments + 1), cumulative, grid)
    knots_q = strictly_increasing(np.rint(knots * 2.0**frac))
    values = _least_squares_values(f, s, knots_q / 2.0**frac)
    values_q = np.clip(np.rint(values * 2.0**OUT_FRAC), -INT16_MAX, INT16_MAX)
    return Pwl.of(knots_q, values_q)


def _least_squares_values(f: str, s: np.ndarray, knots: np.ndarray, max_samples: int = 200_000) -> np.ndarray:
    """Values at the knots of the continuous piecewise-linear function closest (least squares) to
    f on the samples; knots with no sample near them keep f's own value."""
    if len(s) > max_samples:
        s = s[np.random.default_rng(0).choice(len(s), max_samples, replace=False)]
    k = np.clip(np.searchsorted(knots, s, side="right") - 1, 0, len(knots) - 2)
    t = np.clip((s - knots[k]) / (knots[k + 1] - knots[k]), 0, 1)
    n = len(knots)
    gram = np.zeros((n, n))
    rhs = np.zeros(n)
    target = _function(f, s)
    for a, wa in ((k, 1 - t), (k + 1, t)):
        np.add.at(rhs, a, wa * target)
        for b, wb in ((k, 1 - t), (k + 1, t)):
            np.add.at(gram, (a, b), wa * wb)
    ridge = 1e-6 * max(np.trace(gram) / n, 1e-12)  # pulls empty knots towards f's own value
    values = np.linalg.solve(gram + ridge * np.eye(n), rhs + ridge * _function(f, knots))
    return values


# --------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class IntLstmDirection:
    """One direction's integer parameters, as the operator takes them."""

    w: np.ndarray  # int8 [4H, F]
    r: np.ndarray  # int8 [4H, H]
    w_mult: np.ndarray  # int64 [4H]: x_scale * w_scale * 2^(GATE_FRAC + ACC_SHIFT)
    r_mult: np.ndarray  # int64 [4H]: r_scale * 2^(GATE_FRAC + ACC_SHIFT - OUT_FRAC) (h in Q0.15)
    bias: np.ndarray  # int64 [4H]: (Wb + Rb) * 2^(GATE_FRAC + ACC_SHIFT)
    tables: tuple[Pwl, Pwl, Pwl]  # sigmoid, tanh, cell tanh


@dataclass(frozen=True)
class IntLstm:
    x_scale: float
    cell_frac: int
    directions: tuple[IntLstmDirection, ...]


def multipliers(x_scale: float, w_scale: np.ndarray, r_scale: np.ndarray, bias: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    one = 2.0 ** (GATE_FRAC + ACC_SHIFT)
    return (np.rint(np.float64(x_scale) * w_scale.astype(np.float64) * one).astype(np.int64),
            np.rint(r_scale.astype(np.float64) / 2.0**OUT_FRAC * one).astype(np.int64),
            np.rint(bias.astype(np.float64) * one).astype(np.int64))


def cell_frac_for(cell_absmax: float) -> int:
    """Fractional bits of the int16 cell state: the most that keep 1.25x the largest cell value
    calibration saw in range."""
    whole = int(np.ceil(np.log2(max(cell_absmax * 1.25, 2.0**-8))))
    return int(np.clip(15 - max(whole, 0), 0, 15))


# --------------------------------------------------------------------------- float LSTM

def float_lstm_gates(x: np.ndarray, w: np.ndarray, r: np.ndarray, b: np.ndarray, reverse: bool = False,
                     h0: np.ndarray | None = None, c0: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One direction of a float LSTM over x [T, N, F] from h0, c0 [N, H] (zeros if None; ONNX gate
    order i, o, f, c): the sigmoid gates' pre-activations [T, N, 3H], the candidate's [T, N, H] and
    the cell states [T + 1, N, H], the initial one first."""
    t_len, n, _ = x.shape
    hidden = r.shape[1]
    h = np.zeros((n, hidden)) if h0 is None else h0.astype(np.float64)
    c = np.zeros((n, hidden)) if c0 is None else c0.astype(np.float64)
    cells = [c]
    bias = b[: 4 * hidden] + b[4 * hidden:]
    sig, cand = [], []
    xw = x.astype(np.float64) @ w.T.astype(np.float64)
    for t in (range(t_len - 1, -1, -1) if reverse else range(t_len)):
        z = xw[t] + h @ r.T + bias
        i, o, f, g = np.split(z, 4, axis=1)
        sig.append(np.concatenate([i, o, f], axis=1)); cand.append(g)
        c = _function("sigmoid", f) * c + _function("sigmoid", i) * np.tanh(g)
        h = _function("sigmoid", o) * np.tanh(c)
        cells.append(c)
    if not sig:
        return np.zeros((0, n, 3 * hidden)), np.zeros((0, n, hidden)), np.stack(cells)
    return np.stack(sig), np.stack(cand), np.stack(cells)


# --------------------------------------------------------------------------- the operator

def _rshift_round(v: np.ndarray, bits: int) -> np.ndarray:
    return (v + (1 << (bits - 1))) >> bits


def int_lstm_direction(x_q: np.ndarray, d: IntLstmDirection, cell_frac: int, h0_q: np.ndarray, c0: np.ndarray,
                       reverse: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One direction of IntLSTM: x_q int8 codes [T, N, F], initial h (Q0.15) and c (Q cell_frac).
    Returns h in Q0.15 [T, N, H] (sequence order), and the last h (Q0.15) and c."""
    t_len, n, _ = x_q.shape
    hidden = d.r.shape[1]
    sig, tanh_g, tanh_c = d.tables
    h15, c = h0_q.astype(np.int64), c0.astype(np.int64)
    out = np.zeros((t_len, n, hidden), np.int64)
    w, r = d.w.astype(np.int64), d.r.astype(np.int64)
    for t in (range(t_len - 1, -1, -1) if reverse else range(t_len)):
        acc = (x_q[t].astype(np.int64) @ w.T) * d.w_mult + (h15 @ r.T) * d.r_mult + d.bias
        z = np.clip(_rshift_round(acc, ACC_SHIFT), -32768, INT16_MAX)
        i, o, f = (pwl_eval(sig, z[:, k * hidden:(k + 1) * hidden]) for k in range(3))
        g = pwl_eval(tanh_g, z[:, 3 * hidden:])
        c = np.clip(_rshift_round(f * c, OUT_FRAC) + _rshift_round(i * g, 2 * OUT_FRAC - cell_frac),
                    -INT16_MAX, INT16_MAX)
        full = o * pwl_eval(tanh_c, c)  # Q0.30
        h15 = _rshift_round(full, OUT_FRAC)
        out[t] = h15
    return out, h15, c


def quantize_input(x: np.ndarray, scale: float) -> np.ndarray:
    """x on the int8 grid of `scale`, as the operator computes it (float32 product, ties to even)."""
    inverse = np.float32(1) / np.float32(scale)
    return np.clip(np.rint(x.astype(np.float32) * inverse), -127, 127).astype(np.int8)


def int_lstm(params: IntLstm, x: np.ndarray, h0: np.ndarray | None = None, c0: np.ndarray | None = None,
             direction: str = "forward") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IntLSTM's outputs Y [T, D, N, H], Y_h [D, N, H], Y_c [D, N, H] in float32 for x [T, N, F]."""
    x_q = quantize_input(x, params.x_scale)
    t_len, n, _ = x.shape
    hidden = params.directions[0].r.shape[1]
    ys, hs, cs = [], [], []
    for k, d in enumerate(params.directions):
        h_init = np.zeros((n, hidden), np.int64) if h0 is None else np.clip(
            np.rint(h0[k].astype(np.float32) * np.float32(2.0**OUT_FRAC)), -INT16_MAX, INT16_MAX).astype(np.int64)
        c_init = np.zeros((n, hidden), np.int64) if c0 is None else np.clip(
            np.rint(c0[k].astype(np.float32) * np.float32(2.0**params.cell_frac)), -INT16_MAX, INT16_MAX).astype(np.int64)
        reverse = direction == "reverse" or (direction == "bidirectional" and k == 1)
        y, h_last, c_last = int_lstm_direction(x_q, d, params.cell_frac, h_init, c_init, reverse)
        ys.append(y); hs.append(h_last); cs.append(c_last)
    out_scale, cell_scale = np.float32(2.0**-OUT_FRAC), np.float32(2.0**-params.cell_frac)
    return (np.stack(ys, axis=1).astype(np.float32) * out_scale, np.stack(hs).astype(np.float32) * out_scale,
            np.stack(cs).astype(np.float32) * cell_scale)


# --------------------------------------------------------------------------- from calibration

def strictly_increasing(knots: np.ndarray) -> np.ndarray:
    out = knots.astype(np.int64).copy()
    for k in range(1, len(out)):
        out[k] = max(out[k], out[k - 1] + 1)
    return out


def fit(w_codes: np.ndarray, w_scale: np.ndarray, r_codes: np.ndarray, r_scale: np.ndarray, bias: np.ndarray | None,
        xs: list[np.ndarray], direction: str, segments: int = SEGMENTS,
        states: list[tuple[np.ndarray | None, np.ndarray | None]] | None = None) -> IntLstm:
    """IntLSTM parameters for an LSTM with int8 weights (codes [D, 4H, F] and [D, 4H, H], one scale
    per gate row shared by the directions), fitted on its float inputs `xs` (each [T, N, F]) and the
    initial states it was given with each (`states`: (h0, c0), each [D, N, H] or None): the input's
    int8 scale from their largest magnitude, the cell format and the three tables from the gate
    pre-activations and cell values (initial ones included) the LSTM computes with those weights.
    A decoder started from an encoder's state meets cell values a zero start never reaches."""
    dirs, rows, _ = w_codes.shape
    hidden = rows // 4
    bias = np.zeros((dirs, 8 * hidden), np.float32) if bias is None else bias.reshape(dirs, 8 * hidden)
    w = w_codes.astype(np.float64) * w_scale.reshape(1, -1, 1)
    r = r_codes.astype(np.float64) * r_scale.reshape(1, -1, 1)
    x_scale = max(max(float(np.abs(x).max()) for x in xs), 1e-8) / 127
    states = states or [(None, None)] * len(xs)
    fitted = []
    for d in range(dirs):
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        runs = [float_lstm_gates(x, w[d], r[d], bias[d], reverse, None if h0 is None else h0[d],
                                 None if c0 is None else c0[d]) for x, (h0, c0) in zip(xs, states)]
        fitted.append(tuple(np.concatenate([run[part].ravel() for run in runs]) for part in range(3)))
    cell_frac = cell_frac_for(max(float(np.abs(cells).max()) for _, _, cells in fitted))
    out = []
    for d, (gates, candidate, cells) in enumerate(fitted):
        tables = (fit_pwl("sigmoid", gates, GATE_FRAC, segments), fit_pwl("tanh", candidate, GATE_FRAC, segments),
                  fit_pwl("cell_tanh", cells, cell_frac, segments))
        w_mult, r_mult, b = multipliers(x_scale, w_scale, r_scale, bias[d, :rows] + bias[d, rows:])
        out.append(IntLstmDirection(w_codes[d].astype(np.int8), r_codes[d].astype(np.int8), w_mult, r_mult, b, tables))
    return IntLstm(float(np.float32(x_scale)), cell_frac, tuple(out))


def tables_record(params: IntLstm) -> dict:
    """What the plan keeps of fitted parameters (the weights and multipliers follow from the plan's
    int8 weights): the input scale, the cell format, each direction's tables."""
    return {"x_scale": params.x_scale, "cell_frac": params.cell_frac,
            "tables": [[{"knots": t.knots.tolist(), "values": t.values.tolist()} for t in d.tables]
                       for d in params.directions]}


def from_record(record: dict, w_codes: np.ndarray, w_scale: np.ndarray, r_codes: np.ndarray, r_scale: np.ndarray,
                bias: np.ndarray | None) -> IntLstm:
    dirs, rows, _ = w_codes.shape
    bias = np.zeros((dirs, 2 * rows), np.float32) if bias is None else bias.reshape(dirs, 2 * rows)
    out = []
    for d, tables in enumerate(record["tables"]):
        w_mult, r_mult, b = multipliers(record["x_scale"], w_scale, r_scale, bias[d, :rows] + bias[d, rows:])
        pwl = tuple(Pwl.of(np.asarray(t["knots"]), np.asarray(t["values"])) for t in tables)
        out.append(IntLstmDirection(w_codes[d].astype(np.int8), r_codes[d].astype(np.int8), w_mult, r_mult, b, pwl))
    return IntLstm(float(record["x_scale"]), int(record["cell_frac"]), tuple(out))


def operator_inputs(params: IntLstm) -> dict[str, np.ndarray]:
    """IntLSTM's constant inputs, by name (W, R, W_mult, R_mult, Bias, knots, values, slopes)."""
    ds = params.directions
    stack = lambda get: np.stack([get(d) for d in ds])  # noqa: E731
    return {"W": stack(lambda d: d.w), "R": stack(lambda d: d.r), "W_mult": stack(lambda d: d.w_mult),
            "R_mult": stack(lambda d: d.r_mult), "Bias": stack(lambda d: d.bias),
            "knots": stack(lambda d: np.stack([t.knots for t in d.tables])).astype(np.int32),
            "values": stack(lambda d: np.stack([t.values for t in d.tables])).astype(np.int32),
            "slopes": stack(lambda d: np.stack([t.slopes for t in d.tables])).astype(np.int64)}


def unsupported(node) -> str | None:
    """Why IntLSTM cannot run this LSTM node (None when it can)."""
    inputs = list(node.input) + [""] * (8 - len(node.input))
    if inputs[4]:
        return "it takes sequence lengths"
    if inputs[7]:
        return "it has peephole weights"
    if attr(node, "layout", 0) != 0:
        return "its layout is batch-major"
    if attr(node, "input_forget", 0):
        return "it couples the input and forget gates"
    if any(a.name == "clip" for a in node.attribute):
        return "it clips its cell"
    if attr(node, "activations", ("Sigmoid", "Tanh", "Tanh")) not in (("Sigmoid", "Tanh", "Tanh"),
                                                                      ("Sigmoid", "Tanh", "Tanh") * 2):
        return "its activations are not sigmoid and tanh"
    return None
