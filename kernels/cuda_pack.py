"""placeholder"""
def available():
    return False, "not yet"
