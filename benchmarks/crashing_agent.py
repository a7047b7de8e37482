"""An agent that kills itself (SIGKILL, no goodbye) at one step of settling a finished run.

    python3 benchmarks/crashing_agent.py DIR_OF_LOCAL_AGENT start ...     (CRASH_AT=STEP)

STEP: "_finish", "settled", "save after settling" (in RunBook.save once RunBook.settled has
run), "remove_files", "remove_files done" (just after _Job.remove_files returns). Used by
benchmarks/soak.py and test_local_agent.py.
"""
import os
import signal
import sys

sys.path.insert(0, sys.argv.pop(1))
import local_agent as la  # from the directory given first

step = os.environ["CRASH_AT"]
seen = set()


def crash_around(owner, name, when):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        after_settling = (step, name) == ("save after settling", "save") and "settled" in seen
        if when == "before" and (step == name or after_settling):
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        seen.add(name)
        if when == "after" and step == name + " done":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


crash_around(la.LocalAgent, "_finish", "before")
crash_around(la.RunBook, "settled", "before")
crash_around(la.RunBook, "save", "before")
crash_around(la._Job, "remove_files", "before")
crash_around(la._Job, "remove_files", "after")
sys.exit(la.main(sys.argv[1:]))
