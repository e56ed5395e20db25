"""`python -m wafer ...` is the `wafer` command. It is the distribution's console script, found
through its entry point: the server imports nothing of the client."""

from importlib.metadata import entry_points

(command,) = entry_points(group="console_scripts", name="wafer")
command.load()()
