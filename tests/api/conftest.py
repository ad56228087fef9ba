from tests.stack import client, module_processes, processes, settings, stack_env

__all__ = ["client", "module_processes", "processes", "settings", "stack_env"]
