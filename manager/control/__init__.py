"""The control plane: desired state, admission, plans and the reconciler."""
