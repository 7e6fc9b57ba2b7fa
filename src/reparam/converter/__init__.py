"""reparam.converter"""
