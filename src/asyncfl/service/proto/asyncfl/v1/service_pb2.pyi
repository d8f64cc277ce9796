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
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_RING_U32: DType
DTYPE_RING_U64: DType

class CheckInRequest(_message.Message):
    __slots__ = ("num_examples", "task_id")
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    num_examples: int
    task_id: str
    def __init__(self, num_examples: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("task_id", "lease_id", "model_version", "model_dim", "lease_timeout_s", "client_config_json", "model_config_json", "clip_norm", "enclave_report", "enclave_config")
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
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., model_version: _Optional[int] = ..., model_dim: _Optional[int] = ..., lease_timeout_s: _Optional[float] = ..., client_config_json: _Optional[str] = ..., model_config_json: _Optional[str] = ..., clip_norm: _Optional[float] = ..., enclave_report: _Optional[_Union[EnclaveReport, _Mapping]] = ..., enclave_config: _Optional[bytes] = ...) -> None: ...

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
    __slots__ = ("assignment", "retry_after_s", "done")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    retry_after_s: float
    done: bool
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., retry_after_s: _Optional[float] = ..., done: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("model_version", "staleness", "weight", "stepped")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPPED_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    staleness: int
    weight: float
    stepped: bool
    def __init__(self, model_version: _Optional[int] = ..., staleness: _Optional[int] = ..., weight: _Optional[float] = ..., stepped: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("task_id", "algorithm", "model_version", "max_server_steps", "finished", "active_clients", "concurrency_target", "buffered", "accepted_updates", "updates_per_s", "rejected", "dp_enabled", "epsilon", "dp_delta", "epsilon_budget", "budget_spent")
    class RejectedEntry(_message.Message):
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
    def __init__(self, task_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., model_version: _Optional[int] = ..., max_server_steps: _Optional[int] = ..., finished: _Optional[bool] = ..., active_clients: _Optional[int] = ..., concurrency_target: _Optional[int] = ..., buffered: _Optional[int] = ..., accepted_updates: _Optional[int] = ..., updates_per_s: _Optional[float] = ..., rejected: _Optional[_Mapping[str, int]] = ..., dp_enabled: _Optional[bool] = ..., epsilon: _Optional[float] = ..., dp_delta: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., budget_spent: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("tasks", "uptime_s")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    uptime_s: float
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ..., uptime_s: _Optional[float] = ...) -> None: ...
