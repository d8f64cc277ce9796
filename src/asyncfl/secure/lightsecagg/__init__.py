"""LightSecAgg for buffered asynchronous FL without a TEE (So, Ali, Guler & Avestimehr:
"Secure aggregation for buffered asynchronous federated learning", 2021; "LightSecAgg",
MLSys 2022) as sans-I/O user/server state machines plus an in-process driver.

Modules: ``field`` (F_p, p = 2^32 - 5, exact vectorised arithmetic), ``params`` (N, T, U),
``lagrange`` (mask coding and one-shot decoding), ``codec`` (fixed point into F_p),
``messages``, ``user`` / ``server`` (state machines), ``driver`` (in-process runs).
"""

from asyncfl.secure.lightsecagg.codec import FieldCodec
from asyncfl.secure.lightsecagg.driver import (
    GroupStats,
    LightSecAggGroup,
    secure_weighted_sum,
    seeded_entropy,
)
from asyncfl.secure.lightsecagg.field import P
from asyncfl.secure.lightsecagg.lagrange import LagrangeCode, lagrange_matrix
from asyncfl.secure.lightsecagg.messages import (
    AggregateRequest,
    AggregateShare,
    ContributionId,
    EncryptedMaskShare,
    KeyAdvert,
    KeyDirectory,
    MaskedUpload,
    MaskShares,
)
from asyncfl.secure.lightsecagg.params import LightSecAggParams
from asyncfl.secure.lightsecagg.server import LightSecAggServer, UnmaskedSum
from asyncfl.secure.lightsecagg.user import LightSecAggUser

__all__ = [
    "AggregateRequest",
    "AggregateShare",
    "ContributionId",
    "EncryptedMaskShare",
    "FieldCodec",
    "GroupStats",
    "KeyAdvert",
    "KeyDirectory",
    "LagrangeCode",
    "LightSecAggGroup",
    "LightSecAggParams",
    "LightSecAggServer",
    "LightSecAggUser",
    "MaskShares",
    "MaskedUpload",
    "P",
    "UnmaskedSum",
    "lagrange_matrix",
    "secure_weighted_sum",
    "seeded_entropy",
]
