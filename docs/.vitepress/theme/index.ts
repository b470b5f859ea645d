import DefaultTheme from 'vitepress/theme'
import './custom.css'

/** The default theme, with a sidebar wide enough for the API reference's names (custom.css). */
export default DefaultTheme
