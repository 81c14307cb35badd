"""Every JAX name jattn uses that is not part of JAX's stable public API, in one place.

jattn's blockwise kernel is a JAX primitive with hand-written JVP, transpose and
batching rules (see ``_blockwise/_autodiff.py``), which needs a few of JAX's
extension points. They live here so a JAX upgrade is checked in one module;
``pyproject.toml`` pins the JAX range CI tests against.

Names (what jattn uses each for):

* ``Primitive`` (``jax.extend.core``): the blockwise kernel's primitive.
* ``Literal`` (``jax.extend.core``): a constant operand of a jaxpr equation (which inputs a user mod reads).
* ``Var`` (``jax.extend.core``): a variable of a jaxpr equation (the residuals of a split fused pass).
* ``partial_eval`` (``jax.interpreters``): ``custom_partial_eval_rules`` and
  ``partial_eval_jaxpr_custom_rules``, where reverse mode splits the fused
  forward-mode pass (``_blockwise/_partial_eval.py``).
* ``ensure_enum``, ``RecomputeType`` (``jax._src.interpreters.partial_eval``):
  reading a remat policy's answer for one equation.
* ``ad`` (``jax.interpreters.ad``): ``primitive_jvps``, ``primitive_transposes``,
  ``is_undefined_primal``, ``UndefinedPrimal``, ``Zero``, ``instantiate_zeros``.
* ``batching`` (``jax.interpreters.batching``): ``primitive_batchers``, ``not_mapped``.
* ``mlir`` (``jax.interpreters.mlir``): ``register_lowering``, ``lower_fun``.
* ``ShapedArray``, ``Tracer``, ``eval_jaxpr`` (``jax.core``): abstract values of
  the primitive's results, telling a traced value from a concrete one, and
  evaluating a user mod's closed jaxpr.
"""

from __future__ import annotations

from jax._src.interpreters.partial_eval import RecomputeType as RecomputeType
from jax._src.interpreters.partial_eval import ensure_enum as ensure_enum
from jax.core import ShapedArray as ShapedArray
from jax.core import Tracer as Tracer
from jax.core import eval_jaxpr as eval_jaxpr
from jax.extend.core import Literal as Literal
from jax.extend.core import Primitive as Primitive
from jax.extend.core import Var as Var
from jax.interpreters import ad as ad
from jax.interpreters import batching as batching
from jax.interpreters import mlir as mlir
from jax.interpreters import partial_eval as partial_eval
