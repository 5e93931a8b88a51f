"""iicrepro: an end-to-end reproduction of IIC (Tao, Wang, Yamasaki, ACM MM 2020)."""

__version__ = "0.1.0"
