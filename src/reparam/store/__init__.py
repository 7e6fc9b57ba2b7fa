"""reparam.store"""
