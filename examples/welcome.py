"""The Welcome Flow: deploy a flow, schedule a run, and let an agent run it, all on this machine.

    python examples/welcome.py

Nothing to install and no server: runs are kept in ~/.prefect/local_agent.db (or under
PREFECT__HOME_DIR). Point PREFECT__CLOUD__API (or --api) at a Prefect Server to use one.
"""

import os
import sys

# Run from a clean clone without installing: find local_agent.py one directory up.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import local_agent


@local_agent.Flow("Welcome Flow")
def welcome(name: str = "world") -> None:
    """Say welcome in the run's log."""
    local_agent.context["logger"].info("Welcome to local_agent, %s!", name)


# The flow-run process imports this file to find `welcome`: keep side effects under the guard.
if __name__ == "__main__":
    try:
        welcome.deploy("My Project")
        local_agent.create_flow_run("Welcome Flow")
        sys.exit(welcome.run_agent(once=True, show_flow_logs=True))
    except local_agent.AgentError as exc:  # say what is wrong in one line, as the agent's commands do
        sys.exit(f"welcome.py: {exc}")
