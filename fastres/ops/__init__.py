"""torch.library custom ops under torch.ops.fastres, one file per op family."""
from fastres.ops import bn_act, cat_conv, conv, mix, pool, se, slices  # noqa: F401  (registration)
from fastres.ops.reference import ACTS  # noqa: F401
