"""The secure buffer of asynchronous secure aggregation in a (simulated) TEE (Papaya, §5)."""

from asyncfl.secure.tee.attestation import SimulatedVendor, measure, verify_report
from asyncfl.secure.tee.backends import EnclaveBackend, InProcessBackend, SubprocessBackend
from asyncfl.secure.tee.client import MaskedUpdate, TeeClient, expected_measurement
from asyncfl.secure.tee.enclave import EnclaveConfig, SecureBufferEnclave
from asyncfl.secure.tee.messages import AttestationReport, RefusalCode, SealedSeed

__all__ = [
    "AttestationReport",
    "EnclaveBackend",
    "EnclaveConfig",
    "InProcessBackend",
    "MaskedUpdate",
    "RefusalCode",
    "SealedSeed",
    "SecureBufferEnclave",
    "SimulatedVendor",
    "SubprocessBackend",
    "TeeClient",
    "expected_measurement",
    "measure",
    "verify_report",
]
