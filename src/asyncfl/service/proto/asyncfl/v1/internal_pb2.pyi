from . import service_pb2 as _service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeartbeatRequest(_message.Message):
    __slots__ = ("aggregator_id", "instance", "address", "leaving")
    AGGREGATOR_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    aggregator_id: str
    instance: str
    address: str
    leaving: bool
    def __init__(self, aggregator_id: _Optional[str] = ..., instance: _Optional[str] = ..., address: _Optional[str] = ..., leaving: _Optional[bool] = ...) -> None: ...

class OwnedTask(_message.Message):
    __slots__ = ("task_id", "epoch")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    epoch: int
    def __init__(self, task_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[OwnedTask]
    def __init__(self, tasks: _Optional[_Iterable[_Union[OwnedTask, _Mapping]]] = ...) -> None: ...

class RoutesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Route(_message.Message):
    __slots__ = ("task_id", "aggregator_id", "address", "model_version", "finished")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    aggregator_id: str
    address: str
    model_version: int
    finished: bool
    def __init__(self, task_id: _Optional[str] = ..., aggregator_id: _Optional[str] = ..., address: _Optional[str] = ..., model_version: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class RoutesResponse(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("task_id", "client_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    client_id: int
    def __init__(self, task_id: _Optional[str] = ..., client_id: _Optional[int] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("assignment", "full", "finished")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    assignment: _service_pb2.Assignment
    full: bool
    finished: bool
    def __init__(self, assignment: _Optional[_Union[_service_pb2.Assignment, _Mapping]] = ..., full: _Optional[bool] = ..., finished: _Optional[bool] = ...) -> None: ...
