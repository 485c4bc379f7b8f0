"""Compatibility modules: the only places where fedtune touches a dependency's private
members, each checking the installed version and falling back to public behaviour."""
