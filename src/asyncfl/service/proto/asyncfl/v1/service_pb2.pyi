from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_RING_U32: _ClassVar[DType]
    DTYPE_RING_U64: _ClassVar[DType]

class SecAggStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_STAGE_UNSPECIFIED: _ClassVar[SecAggStage]
    SECAGG_STAGE_JOIN: _ClassVar[SecAggStage]
    SECAGG_STAGE_ADVERTISE_KEYS: _ClassVar[SecAggStage]
    SECAGG_STAGE_SHARE_KEYS: _ClassVar[SecAggStage]
    SECAGG_STAGE_MASKED_INPUT: _ClassVar[SecAggStage]
    SECAGG_STAGE_UNMASKING: _ClassVar[SecAggStage]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_RING_U32: DType
DTYPE_RING_U64: DType
SECAGG_STAGE_UNSPECIFIED: SecAggStage
SECAGG_STAGE_JOIN: SecAggStage
SECAGG_STAGE_ADVERTISE_KEYS: SecAggStage
SECAGG_STAGE_SHARE_KEYS: SecAggStage
SECAGG_STAGE_MASKED_INPUT: SecAggStage
SECAGG_STAGE_UNMASKING: SecAggStage

class CheckInRequest(_message.Message):
    __slots__ = ("num_examples", "task_id")
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    num_examples: int
    task_id: str
    def __init__(self, num_examples: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("task_id", "lease_id", "model_version", "model_dim", "lease_timeout_s", "client_config_json", "model_config_json", "clip_norm", "enclave_report", "enclave_config", "aggregator_address", "secagg")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIM_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_REPORT_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    model_version: int
    model_dim: int
    lease_timeout_s: float
    client_config_json: str
    model_config_json: str
    clip_norm: float
    enclave_report: EnclaveReport
    enclave_config: bytes
    aggregator_address: str
    secagg: SecAggParams
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., model_version: _Optional[int] = ..., model_dim: _Optional[int] = ..., lease_timeout_s: _Optional[float] = ..., client_config_json: _Optional[str] = ..., model_config_json: _Optional[str] = ..., clip_norm: _Optional[float] = ..., enclave_report: _Optional[_Union[EnclaveReport, _Mapping]] = ..., enclave_config: _Optional[bytes] = ..., aggregator_address: _Optional[str] = ..., secagg: _Optional[_Union[SecAggParams, _Mapping]] = ...) -> None: ...

class EnclaveReport(_message.Message):
    __slots__ = ("measurement", "public_key", "epoch", "signature")
    MEASUREMENT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    measurement: bytes
    public_key: bytes
    epoch: bytes
    signature: bytes
    def __init__(self, measurement: _Optional[bytes] = ..., public_key: _Optional[bytes] = ..., epoch: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SealedSeed(_message.Message):
    __slots__ = ("update_id", "ephemeral_public", "ciphertext")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    update_id: bytes
    ephemeral_public: bytes
    ciphertext: bytes
    def __init__(self, update_id: _Optional[bytes] = ..., ephemeral_public: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class CheckInResponse(_message.Message):
    __slots__ = ("assignment", "retry_after_s", "done", "lightsecagg_tasks", "lightsecagg_addresses")
    class LightsecaggAddressesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LIGHTSECAGG_TASKS_FIELD_NUMBER: _ClassVar[int]
    LIGHTSECAGG_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    retry_after_s: float
    done: bool
    lightsecagg_tasks: _containers.RepeatedScalarFieldContainer[str]
    lightsecagg_addresses: _containers.ScalarMap[str, str]
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., retry_after_s: _Optional[float] = ..., done: _Optional[bool] = ..., lightsecagg_tasks: _Optional[_Iterable[str]] = ..., lightsecagg_addresses: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("model_version", "model_dim", "offset", "data")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    model_dim: int
    offset: int
    data: bytes
    def __init__(self, model_version: _Optional[int] = ..., model_dim: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("task_id", "lease_id", "upload_id", "base_version", "num_examples", "dim", "dtype", "tee_epoch", "sealed_seed")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TEE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEALED_SEED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    upload_id: str
    base_version: int
    num_examples: int
    dim: int
    dtype: DType
    tee_epoch: bytes
    sealed_seed: SealedSeed
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., upload_id: _Optional[str] = ..., base_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., tee_epoch: _Optional[bytes] = ..., sealed_seed: _Optional[_Union[SealedSeed, _Mapping]] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("model_version", "staleness", "weight", "stepped", "lightsecagg_buffer_id")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPPED_FIELD_NUMBER: _ClassVar[int]
    LIGHTSECAGG_BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    staleness: int
    weight: float
    stepped: bool
    lightsecagg_buffer_id: int
    def __init__(self, model_version: _Optional[int] = ..., staleness: _Optional[int] = ..., weight: _Optional[float] = ..., stepped: _Optional[bool] = ..., lightsecagg_buffer_id: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("task_id", "algorithm", "model_version", "max_server_steps", "finished", "active_clients", "concurrency_target", "buffered", "accepted_updates", "updates_per_s", "rejected", "dp_enabled", "epsilon", "dp_delta", "epsilon_budget", "budget_spent", "discarded_updates", "secagg_rounds_applied", "secagg_rounds_failed", "secagg_dropouts")
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class SecaggDropoutsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_SERVER_STEPS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_TARGET_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_UPDATES_FIELD_NUMBER: _ClassVar[int]
    UPDATES_PER_S_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DP_ENABLED_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SPENT_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_UPDATES_FIELD_NUMBER: _ClassVar[int]
    SECAGG_ROUNDS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    SECAGG_ROUNDS_FAILED_FIELD_NUMBER: _ClassVar[int]
    SECAGG_DROPOUTS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    algorithm: str
    model_version: int
    max_server_steps: int
    finished: bool
    active_clients: int
    concurrency_target: int
    buffered: int
    accepted_updates: int
    updates_per_s: float
    rejected: _containers.ScalarMap[str, int]
    dp_enabled: bool
    epsilon: float
    dp_delta: float
    epsilon_budget: float
    budget_spent: bool
    discarded_updates: int
    secagg_rounds_applied: int
    secagg_rounds_failed: int
    secagg_dropouts: _containers.ScalarMap[str, int]
    def __init__(self, task_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., model_version: _Optional[int] = ..., max_server_steps: _Optional[int] = ..., finished: _Optional[bool] = ..., active_clients: _Optional[int] = ..., concurrency_target: _Optional[int] = ..., buffered: _Optional[int] = ..., accepted_updates: _Optional[int] = ..., updates_per_s: _Optional[float] = ..., rejected: _Optional[_Mapping[str, int]] = ..., dp_enabled: _Optional[bool] = ..., epsilon: _Optional[float] = ..., dp_delta: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., budget_spent: _Optional[bool] = ..., discarded_updates: _Optional[int] = ..., secagg_rounds_applied: _Optional[int] = ..., secagg_rounds_failed: _Optional[int] = ..., secagg_dropouts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("tasks", "uptime_s")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    uptime_s: float
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class LocateRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class LocateResponse(_message.Message):
    __slots__ = ("aggregator_address",)
    AGGREGATOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    aggregator_address: str
    def __init__(self, aggregator_address: _Optional[str] = ...) -> None: ...

class SecAggParams(_message.Message):
    __slots__ = ("mode", "clip", "frac_bits", "ring_bits", "threshold_fraction", "corrupt_fraction", "dropout_fraction", "stage_timeout_s", "min_inputs", "noise_std", "max_weight")
    MODE_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    STAGE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MIN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    mode: str
    clip: float
    frac_bits: int
    ring_bits: int
    threshold_fraction: float
    corrupt_fraction: float
    dropout_fraction: float
    stage_timeout_s: float
    min_inputs: int
    noise_std: float
    max_weight: int
    def __init__(self, mode: _Optional[str] = ..., clip: _Optional[float] = ..., frac_bits: _Optional[int] = ..., ring_bits: _Optional[int] = ..., threshold_fraction: _Optional[float] = ..., corrupt_fraction: _Optional[float] = ..., dropout_fraction: _Optional[float] = ..., stage_timeout_s: _Optional[float] = ..., min_inputs: _Optional[int] = ..., noise_std: _Optional[float] = ..., max_weight: _Optional[int] = ...) -> None: ...

class SecAggJoin(_message.Message):
    __slots__ = ("num_examples",)
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    num_examples: int
    def __init__(self, num_examples: _Optional[int] = ...) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("c_pk", "s_pk")
    C_PK_FIELD_NUMBER: _ClassVar[int]
    S_PK_FIELD_NUMBER: _ClassVar[int]
    c_pk: bytes
    s_pk: bytes
    def __init__(self, c_pk: _Optional[bytes] = ..., s_pk: _Optional[bytes] = ...) -> None: ...

class SecAggPeerKeys(_message.Message):
    __slots__ = ("client_id", "c_pk", "s_pk")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    C_PK_FIELD_NUMBER: _ClassVar[int]
    S_PK_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    c_pk: bytes
    s_pk: bytes
    def __init__(self, client_id: _Optional[int] = ..., c_pk: _Optional[bytes] = ..., s_pk: _Optional[bytes] = ...) -> None: ...

class SecAggCiphertext(_message.Message):
    __slots__ = ("peer", "ciphertext")
    PEER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    peer: int
    ciphertext: bytes
    def __init__(self, peer: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggShares(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SecAggCiphertext]
    def __init__(self, shares: _Optional[_Iterable[_Union[SecAggCiphertext, _Mapping]]] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    share: bytes
    def __init__(self, owner: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskShares(_message.Message):
    __slots__ = ("b_shares", "s_shares")
    B_SHARES_FIELD_NUMBER: _ClassVar[int]
    S_SHARES_FIELD_NUMBER: _ClassVar[int]
    b_shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    s_shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    def __init__(self, b_shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ..., s_shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("task_id", "lease_id", "session_id", "join", "advertise_keys", "share_keys", "unmask", "poll")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEYS_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    POLL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    session_id: bytes
    join: SecAggJoin
    advertise_keys: SecAggKeys
    share_keys: SecAggShares
    unmask: SecAggUnmaskShares
    poll: SecAggStage
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., session_id: _Optional[bytes] = ..., join: _Optional[_Union[SecAggJoin, _Mapping]] = ..., advertise_keys: _Optional[_Union[SecAggKeys, _Mapping]] = ..., share_keys: _Optional[_Union[SecAggShares, _Mapping]] = ..., unmask: _Optional[_Union[SecAggUnmaskShares, _Mapping]] = ..., poll: _Optional[_Union[SecAggStage, str]] = ...) -> None: ...

class SecAggRound(_message.Message):
    __slots__ = ("session_id", "model_version", "participants", "graph_seed", "weight")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    model_version: int
    participants: _containers.RepeatedScalarFieldContainer[int]
    graph_seed: int
    weight: int
    def __init__(self, session_id: _Optional[bytes] = ..., model_version: _Optional[int] = ..., participants: _Optional[_Iterable[int]] = ..., graph_seed: _Optional[int] = ..., weight: _Optional[int] = ...) -> None: ...

class SecAggKeyBroadcast(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[SecAggPeerKeys]
    def __init__(self, keys: _Optional[_Iterable[_Union[SecAggPeerKeys, _Mapping]]] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggDone(_message.Message):
    __slots__ = ("model_version", "survivors")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    survivors: int
    def __init__(self, model_version: _Optional[int] = ..., survivors: _Optional[int] = ...) -> None: ...

class SecAggResponse(_message.Message):
    __slots__ = ("retry_after_s", "round", "key_broadcast", "share_broadcast", "unmask_request", "done")
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KEY_BROADCAST_FIELD_NUMBER: _ClassVar[int]
    SHARE_BROADCAST_FIELD_NUMBER: _ClassVar[int]
    UNMASK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    retry_after_s: float
    round: SecAggRound
    key_broadcast: SecAggKeyBroadcast
    share_broadcast: SecAggShares
    unmask_request: SecAggUnmaskRequest
    done: SecAggDone
    def __init__(self, retry_after_s: _Optional[float] = ..., round: _Optional[_Union[SecAggRound, _Mapping]] = ..., key_broadcast: _Optional[_Union[SecAggKeyBroadcast, _Mapping]] = ..., share_broadcast: _Optional[_Union[SecAggShares, _Mapping]] = ..., unmask_request: _Optional[_Union[SecAggUnmaskRequest, _Mapping]] = ..., done: _Optional[_Union[SecAggDone, _Mapping]] = ...) -> None: ...

class SecAggInputHeader(_message.Message):
    __slots__ = ("task_id", "lease_id", "session_id", "dim", "dtype")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    session_id: bytes
    dim: int
    dtype: DType
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., session_id: _Optional[bytes] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class SecAggInputChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: SecAggInputHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[SecAggInputHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LightSecAggRegisterRequest(_message.Message):
    __slots__ = ("task_id", "public_key")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    public_key: bytes
    def __init__(self, task_id: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class LightSecAggGroup(_message.Message):
    __slots__ = ("num_users", "privacy_threshold", "target_survivors", "dim", "min_contributions", "session_id", "clip", "frac_bits", "weight_bits", "registered", "public_keys")
    NUM_USERS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TARGET_SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MIN_CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BITS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    num_users: int
    privacy_threshold: int
    target_survivors: int
    dim: int
    min_contributions: int
    session_id: bytes
    clip: float
    frac_bits: int
    weight_bits: int
    registered: int
    public_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, num_users: _Optional[int] = ..., privacy_threshold: _Optional[int] = ..., target_survivors: _Optional[int] = ..., dim: _Optional[int] = ..., min_contributions: _Optional[int] = ..., session_id: _Optional[bytes] = ..., clip: _Optional[float] = ..., frac_bits: _Optional[int] = ..., weight_bits: _Optional[int] = ..., registered: _Optional[int] = ..., public_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LightSecAggPollRequest(_message.Message):
    __slots__ = ("task_id", "after_seq")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    after_seq: int
    def __init__(self, task_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class LightSecAggShare(_message.Message):
    __slots__ = ("sender", "contribution_seq", "receiver", "ciphertext", "buffer_id")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    sender: int
    contribution_seq: int
    receiver: int
    ciphertext: bytes
    buffer_id: int
    def __init__(self, sender: _Optional[int] = ..., contribution_seq: _Optional[int] = ..., receiver: _Optional[int] = ..., ciphertext: _Optional[bytes] = ..., buffer_id: _Optional[int] = ...) -> None: ...

class LightSecAggRequest(_message.Message):
    __slots__ = ("buffer_id", "senders", "seqs", "weights")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SENDERS_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    buffer_id: int
    senders: _containers.RepeatedScalarFieldContainer[int]
    seqs: _containers.RepeatedScalarFieldContainer[int]
    weights: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, buffer_id: _Optional[int] = ..., senders: _Optional[_Iterable[int]] = ..., seqs: _Optional[_Iterable[int]] = ..., weights: _Optional[_Iterable[int]] = ...) -> None: ...

class LightSecAggSettled(_message.Message):
    __slots__ = ("below", "open")
    BELOW_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    below: int
    open: int
    def __init__(self, below: _Optional[int] = ..., open: _Optional[int] = ...) -> None: ...

class LightSecAggMailboxItem(_message.Message):
    __slots__ = ("seq", "share", "request", "settled")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    share: LightSecAggShare
    request: LightSecAggRequest
    settled: LightSecAggSettled
    def __init__(self, seq: _Optional[int] = ..., share: _Optional[_Union[LightSecAggShare, _Mapping]] = ..., request: _Optional[_Union[LightSecAggRequest, _Mapping]] = ..., settled: _Optional[_Union[LightSecAggSettled, _Mapping]] = ...) -> None: ...

class LightSecAggAnswerRequest(_message.Message):
    __slots__ = ("task_id", "buffer_id", "share")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    buffer_id: int
    share: bytes
    def __init__(self, task_id: _Optional[str] = ..., buffer_id: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class LightSecAggAnswerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LightSecAggUploadHeader(_message.Message):
    __slots__ = ("task_id", "lease_id", "upload_id", "base_version", "num_examples", "dim", "contribution_seq")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_SEQ_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    upload_id: str
    base_version: int
    num_examples: int
    dim: int
    contribution_seq: int
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., upload_id: _Optional[str] = ..., base_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., dim: _Optional[int] = ..., contribution_seq: _Optional[int] = ...) -> None: ...

class LightSecAggUploadChunk(_message.Message):
    __slots__ = ("header", "share", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: LightSecAggUploadHeader
    share: LightSecAggShare
    data: bytes
    def __init__(self, header: _Optional[_Union[LightSecAggUploadHeader, _Mapping]] = ..., share: _Optional[_Union[LightSecAggShare, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
