"""Whether a tensor's memory is still held, by anything: a weak reference to its storage, not to its Python object
(saved-tensor hooks keep detached aliases, so the object can die while the memory stays)."""

from torch.multiprocessing.reductions import StorageWeakRef


def storage_ref(tensor) -> StorageWeakRef:
    return StorageWeakRef(tensor.untyped_storage())


def held(refs) -> int:
    """How many of `refs` still point at live memory."""
    return sum(not ref.expired() for ref in refs)
