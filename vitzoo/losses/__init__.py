"""Training losses of the vitzoo methods (each method's losses in its own module, re-exported here)."""
