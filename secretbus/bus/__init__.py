"""The D-Bus front end (service) and the D-Bus client."""
