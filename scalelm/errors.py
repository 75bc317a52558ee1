"""Errors meant for people: each carries one line that names the thing at fault and what to do.

The CLI prints `scalelm: error: <message>` for these and exits with status 2, instead of a
traceback. Anything else that escapes is a bug in scalelm and keeps its traceback.
"""


class ScalelmError(Exception):
    """A problem with the user's input, config or files, explained in one line. `quiet`: another rank of the run
    reports this one (parallel/topology.py: process_group, before_the_ranks_meet), so this rank says nothing."""

    quiet = False


class ConfigError(ScalelmError):
    """A config field has a bad value; the message names the field, the value and the fix."""


class DataError(ScalelmError):
    """An input file, shard, manifest or tokenizer cannot be used as it is."""


class CheckpointError(ScalelmError):
    """A checkpoint is missing, damaged, or does not fit the run that wants to load it."""


class ConversionError(ScalelmError):
    """A model cannot be converted (a layout the target cannot represent, a bad dtype), or the converted
    model does not compute what the source does."""


class TrainingError(ScalelmError):
    """Training cannot go on (say, a run of non-finite losses); the last good checkpoint is intact."""


class PeerLost(ScalelmError):
    """A rank stopped answering (its host lost, the process killed, stopped or stuck): the run ends with status 75
    and the newest checkpoint resumes it."""


class Stopped(Exception):
    """Training stopped on request (SIGTERM) after saving a checkpoint; the same command resumes it."""
