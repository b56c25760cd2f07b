"""The package version, in a module of its own: anything can read it without importing the
package's entry points (which would tie every module to train.py)."""

__version__ = "0.1.0"
