"""``bench/device_smoke.py``, the first part of a device session (``bench/device_check.sh``), on any backend."""

import re

import jax.numpy as jnp
import numpy as np

from bench import device_smoke


def test_a_correct_path_measures_small_and_a_refusing_one_is_named():
    """A small error for a correct path, the error's name for one that refuses (cuDNN takes no float32), so
    one failing path hides none of the others."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 2, 8)).astype(np.float32) for _ in range(3))
    lengths = np.array([3, 7], np.int32)
    want = device_smoke.truth(q, k, v, {"is_causal": True, "key_value_seq_lengths": lengths})
    args = [jnp.asarray(x) for x in (q, k, v)]
    options = {"is_causal": True, "key_value_seq_lengths": jnp.asarray(lengths)}
    text = device_smoke.check(args, options, "blockwise", "highest", want)
    out, dq = (float(x) for x in re.fullmatch(r"out (\S+) dq (\S+)", text).groups())
    assert out < 1e-5 and dq < 1e-5, text
    assert device_smoke.check(args, options, "cudnn", "default", want).startswith("ValueError: implementation='cudnn'")
