"""Task YAML templates and their document functions (``docs.py``); see ``gateskip.eval.taskconfigs``."""
