"""`python3 -m piagent.states`: print the state catalogue as JSON.

The agent asks for it in a child process so that the long-running agent does not import every
state module just to describe them: an idle agent stays small (see Agent.catalog).
"""

import json
import sys

from . import catalog

json.dump(catalog(), sys.stdout, sort_keys=True)
