"""Progress bars: tqdm's notebook widgets where ipywidgets is installed, its text bars everywhere
else. tqdm.auto alone chooses the widgets in any notebook and, without ipywidgets, warns
"IProgress not found" before falling back to text."""
import importlib.util

if importlib.util.find_spec("ipywidgets") is None:
    from tqdm.std import tqdm
else:
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
