/* UTF-8 as Unicode's table 3-7 has it (no overlong form, no surrogate, nothing above
 * U+10FFFF), for the C extensions that check it as they go: data_prep/_jsonlines.c and
 * data_prep/_spm_premap.c. Included after Python.h. */
#ifndef T5JA_UTF8_H
#define T5JA_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* The length of the character a byte starts, or 0 if no character starts with it (a
 * continuation byte, an overlong lead C0/C1, F5 and up). */
static inline int utf8_length(unsigned lead)
{
    return lead < 0x80 ? 1 : lead >= 0xC2 && lead <= 0xDF ? 2 : lead >= 0xE0 && lead <= 0xEF ? 3
         : lead >= 0xF0 && lead <= 0xF4 ? 4 : 0;
}

/* Decodes the character at s (n bytes there) into *cp and returns its length, or 0 if the
 * bytes there are not one. */
static inline int utf8_decode(const unsigned char *s, ptrdiff_t n, uint32_t *cp)
{
    int length = utf8_length(s[0]);
    if (length == 0 || n < length)
        return 0;
    for (int i = 1; i < length; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    switch (length) {
    case 1:
        *cp = s[0];
        return 1;
    case 2:
        *cp = ((uint32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
        return 2;
    case 3:
        *cp = ((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        return *cp < 0x800 || (*cp >= 0xD800 && *cp <= 0xDFFF) ? 0 : 3;
    default:
        *cp = ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12)
            | ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        return *cp < 0x10000 || *cp > 0x10FFFF ? 0 : 4;
    }
}

#endif
