"""The import-time lines of other libraries that the command drops, and only those."""

import logging

from loratune.import_noise import silence_import_noise


def test_only_the_known_lines_are_dropped(caplog):
    silence_import_noise()
    silence_import_noise()  # idempotent: one filter per known line
    assert len(logging.getLogger("torchao").filters) == 2
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.so: Could not load this library")
        logging.getLogger("torch.utils._pytree").warning(
            "%s is an Enum subclass and is now natively supported by torch.compile", "<enum 'KernelPreference'>")
        logging.getLogger("torchao").warning("quantization config is invalid")
        logging.getLogger("torch.utils._pytree").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["quantization config is invalid", "something else"]
